"""The OpenAI-compatible API, driven over HTTP as clients use it.

The official ``openai`` SDK (sync and async, streaming and not), ``curl -N`` for the raw SSE
wire format, and httpx/requests where headers or exact bodies matter. The model has random
weights: texts are gibberish, but greedy decoding (temperature 0) is deterministic, so
streamed and non-streamed answers, stop strings and seeds can be compared exactly.

The incremental detokenizer and the stop-string matcher are also tested directly, with the
real tokenizer, since random weights seldom generate the byte tokens that make CJK text hard.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import random
import re
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import requests
from openai import AsyncOpenAI, OpenAI

from openelm_server.engine.output import IncrementalDetokenizer, StopStringMatcher

REPLACEMENT = "\ufffd"
ENGLISH = "Once upon a time there was"
CHINESE = "你好，请介绍一下你自己。"
PROMPTS = [ENGLISH, CHINESE, "def fibonacci(n):", "绍兴是一个美丽的城市。"]
ZEPHYR_HI = "<|user|>\nHi</s>\n<|assistant|>\n"
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_name(serving_dirs) -> str:
    return serving_dirs[0].name


@pytest.fixture(scope="session")
def tokenizer(serving_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(serving_dirs[1]), use_fast=False)


@pytest.fixture(scope="session")
def llama_tokenizer(shared_tokenizer_dir):
    """The real Llama-2 tokenizer (byte fallback for rare CJK characters and emoji)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_tokenizer_dir), use_fast=False)


@pytest.fixture(scope="session")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def async_client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def complete(client, model, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def chat(client, model, messages, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Streamed:
    """What a stream of completion chunks said, by choice index."""

    def __init__(self):
        self.pieces: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage = None
        self.ids: set[str] = set()
        self.chunks = []

    def text(self, index: int = 0) -> str:
        return "".join(self.pieces.get(index, []))


def _collect(stream, pieces_of) -> Streamed:
    """Chunks of a stream by choice; ``pieces_of(chunk)`` gives (index, text or None, finish_reason)."""
    out = Streamed()
    for chunk in stream:
        out.chunks.append(chunk)
        out.ids.add(chunk.id)
        assert out.usage is None, "nothing may follow the usage chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            out.usage = chunk.usage
            continue
        for index, text, finish_reason in pieces_of(chunk):
            assert out.finish.get(index) is None, f"choice {index} continued after it finished"
            if text is not None:
                out.pieces.setdefault(index, []).append(text)
            out.finish[index] = finish_reason
    return out


def collect_completion_stream(stream) -> Streamed:
    return _collect(stream, lambda chunk: [(c.index, c.text, c.finish_reason) for c in chunk.choices])


def collect_chat_stream(stream) -> Streamed:
    def pieces_of(chunk):
        (choice,) = chunk.choices
        return [(0, choice.delta.content, choice.finish_reason)]

    return _collect(stream, pieces_of)


def assert_clean_pieces(pieces: list[str], full: str) -> None:
    """No piece shows U+FFFD unless the whole text has one; the pieces joined are the text."""
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert not [p for p in pieces if REPLACEMENT in p], pieces


def curl_sse(url: str, body: dict, tmp_path: Path) -> tuple[str, list[str]]:
    """POST with ``curl -N``; the response headers and the raw SSE events."""
    headers = tmp_path / "headers.txt"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "--max-time",
            "60",
            "-D",
            str(headers),
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
            url,
        ],
        capture_output=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    raw = done.stdout.decode("utf-8")
    assert raw.endswith("\n\n"), repr(raw[-200:])
    return headers.read_text(), raw[:-2].split("\n\n")


def parse_events(events: list[str]) -> list[dict]:
    assert events[-1] == "data: [DONE]"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payloads.append(json.loads(event[len("data: ") :]))
    return payloads


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until_idle(server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "openelm_requests_running") == 0 and metric(server, "openelm_requests_waiting") == 0:
            return True
        time.sleep(0.05)
    return False


# ---- /v1/models -----------------------------------------------------------------------------


def test_models_lists_the_served_model(client, model_name, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    card = models.data[0]
    assert card.object == "model"
    assert isinstance(card.created, int) and card.created <= time.time() + 5
    assert card.owned_by
    raw = requests.get(server.url + "/v1/models", timeout=10).json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 512


# ---- /v1/completions ------------------------------------------------------------------------


def test_completion_fields_and_usage(client, model_name, tokenizer):
    before = int(time.time())
    result = complete(client, model_name, ENGLISH, max_tokens=12)
    assert result.id.startswith("cmpl-")
    assert result.object == "text_completion"
    assert result.model == model_name
    assert before - 2 <= result.created <= time.time() + 2
    (choice,) = result.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.text
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == n_tokens(tokenizer, ENGLISH)
    assert tokenizer(ENGLISH).input_ids[0] == tokenizer.bos_token_id
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    again = complete(client, model_name, ENGLISH, max_tokens=12)
    assert again.choices[0].text == choice.text, "greedy decoding must be deterministic"
    assert again.id != result.id


def test_completion_default_max_tokens_is_16(client, model_name):
    result = client.completions.create(model=model_name, prompt=ENGLISH, temperature=0)
    assert result.usage.completion_tokens == 16
    assert result.choices[0].finish_reason == "length"


def test_greedy_completions_match_the_reference(
    client, shared_model_dir, shared_tokenizer_dir, serving_dirs, llama_tokenizer
):
    """The served greedy continuation is the reference implementation's, token for token
    (checked on text, decoded in one go, so the detokenizer is checked too)."""
    if serving_dirs[0] != shared_model_dir:
        pytest.skip("the live server does not serve the shared fixture")
    reference = json.loads((shared_model_dir / "reference.json").read_text())
    for case in reference["cases"]:
        prompt_ids, greedy_ids = case["prompt_ids"], case["greedy_ids"]
        prompt = llama_tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert llama_tokenizer(prompt).input_ids == prompt_ids
        whole = llama_tokenizer.decode(prompt_ids + greedy_ids, skip_special_tokens=True)
        assert whole.startswith(prompt)
        result = complete(client, shared_model_dir.name, prompt, max_tokens=len(greedy_ids))
        assert result.choices[0].text == whole[len(prompt) :], prompt
        assert result.usage.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_stream_equals_non_stream(client, model_name, prompt):
    whole = complete(client, model_name, prompt, max_tokens=16)
    streamed = collect_completion_stream(
        complete(client, model_name, prompt, max_tokens=16, stream=True, stream_options={"include_usage": True})
    )
    text = whole.choices[0].text
    assert streamed.text() == text
    assert_clean_pieces(streamed.pieces[0], text)
    assert streamed.finish == {0: "length"}
    assert streamed.usage is not None and streamed.usage.model_dump() == whole.usage.model_dump()
    (stream_id,) = streamed.ids
    assert stream_id.startswith("cmpl-")
    assert {c.model for c in streamed.chunks} == {model_name}
    assert {c.object for c in streamed.chunks} == {"text_completion"}
    assert len({c.created for c in streamed.chunks}) == 1


def test_completion_stream_without_usage_option_has_no_usage_chunk(client, model_name):
    streamed = collect_completion_stream(complete(client, model_name, ENGLISH, max_tokens=8, stream=True))
    assert streamed.usage is None
    assert streamed.finish == {0: "length"}
    assert all(c.choices for c in streamed.chunks)


def test_raw_sse_with_curl(server, model_name, tmp_path):
    body = {
        "model": model_name,
        "prompt": CHINESE,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers, events = curl_sse(server.url + "/v1/completions", body, tmp_path)
    assert re.search(r"^content-type: text/event-stream", headers, re.IGNORECASE | re.MULTILINE), headers
    payloads = parse_events(events)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 10
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]][-1] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])
    streamed = "".join(p["choices"][0]["text"] for p in payloads[:-1])
    plain = requests.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert streamed == plain["choices"][0]["text"]
    assert payloads[-1]["usage"] == plain["usage"]


def test_raw_chat_sse_with_curl(server, model_name, tmp_path):
    body = {"model": model_name, "messages": user(CHINESE), "max_tokens": 10, "temperature": 0, "stream": True}
    headers, events = curl_sse(server.url + "/v1/chat/completions", body, tmp_path)
    assert re.search(r"^content-type: text/event-stream", headers, re.IGNORECASE | re.MULTILINE), headers
    payloads = parse_events(events)
    assert all(p["object"] == "chat.completion.chunk" and len(p["choices"]) == 1 for p in payloads)
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads)
    plain = requests.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_sampled_stream_equals_non_stream_with_a_seed(client, model_name):
    """Sampling at a high temperature produces stray byte tokens too: the stream still joins
    into the non-streamed text, and shows U+FFFD only where that text has it."""
    for seed in (1, 2, 3):
        kwargs = dict(max_tokens=16, temperature=1.5, seed=seed)
        whole = complete(client, model_name, CHINESE, **kwargs).choices[0].text
        streamed = collect_completion_stream(complete(client, model_name, CHINESE, stream=True, **kwargs))
        assert_clean_pieces(streamed.pieces[0], whole)


def test_echo_returns_prompt_and_completion(client, model_name, tokenizer):
    for prompt in (ENGLISH, CHINESE):
        plain = complete(client, model_name, prompt, max_tokens=8)
        echoed = complete(client, model_name, prompt, max_tokens=8, echo=True)
        assert echoed.choices[0].text == prompt + plain.choices[0].text
        assert echoed.usage.model_dump() == plain.usage.model_dump()
        streamed = collect_completion_stream(complete(client, model_name, prompt, max_tokens=8, echo=True, stream=True))
        assert streamed.text() == prompt + plain.choices[0].text
        assert streamed.pieces[0][0] == prompt


def test_prompt_list_gives_one_choice_per_prompt(client, model_name, tokenizer):
    prompts = [ENGLISH, CHINESE, "def fibonacci(n):"]
    singles = [complete(client, model_name, p, max_tokens=8).choices[0].text for p in prompts]
    batch = complete(client, model_name, prompts, max_tokens=8)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == singles
    assert [c.finish_reason for c in batch.choices] == ["length"] * 3
    assert batch.usage.prompt_tokens == sum(n_tokens(tokenizer, p) for p in prompts)
    assert batch.usage.completion_tokens == 24
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + 24

    streamed = collect_completion_stream(
        complete(client, model_name, prompts, max_tokens=8, stream=True, stream_options={"include_usage": True})
    )
    assert sorted(streamed.pieces) == [0, 1, 2]
    assert [streamed.text(i) for i in range(3)] == singles
    assert streamed.finish == {0: "length", 1: "length", 2: "length"}
    assert streamed.usage.model_dump() == batch.usage.model_dump()
    assert len(streamed.ids) == 1


def test_prompt_list_with_echo_and_stream(client, model_name):
    prompts = ["The quick brown fox", "你好"]
    singles = [complete(client, model_name, p, max_tokens=6).choices[0].text for p in prompts]
    batch = complete(client, model_name, prompts, max_tokens=6, echo=True)
    assert [c.text for c in batch.choices] == [p + s for p, s in zip(prompts, singles)]
    streamed = collect_completion_stream(complete(client, model_name, prompts, max_tokens=6, echo=True, stream=True))
    assert [streamed.text(i) for i in range(2)] == [p + s for p, s in zip(prompts, singles)]


# ---- stop strings ---------------------------------------------------------------------------


def stop_in_the_middle(pieces: list[str]) -> str:
    """A stop string that spans two streamed pieces (so two tokens) around the middle of the
    text, and whose first occurrence is there."""
    text = "".join(pieces)
    boundaries = []
    position = 0
    for piece in pieces[:-1]:
        position += len(piece)
        boundaries.append(position)
    boundaries.sort(key=lambda b: abs(b - len(text) // 2))
    for boundary in boundaries:
        for before, after in ((2, 2), (1, 2), (2, 1), (1, 1)):
            start, end = boundary - before, boundary + after
            if start <= 0 or end > len(text):
                continue
            stop = text[start:end]
            if stop.strip() and REPLACEMENT not in stop and text.find(stop) == start:
                return stop
    raise AssertionError(f"no usable stop string in {pieces!r}")


@pytest.mark.parametrize("prompt", [ENGLISH, CHINESE])
def test_stop_string_spanning_tokens(client, model_name, prompt):
    first = collect_completion_stream(complete(client, model_name, prompt, max_tokens=16, stream=True))
    text = first.text()
    stop = stop_in_the_middle(first.pieces[0])
    expected = text[: text.find(stop)]

    result = complete(client, model_name, prompt, max_tokens=16, stop=[stop])
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 16

    streamed = collect_completion_stream(
        complete(
            client, model_name, prompt, max_tokens=16, stop=stop, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed.text() == expected
    assert all(stop not in piece for piece in streamed.pieces[0])
    assert streamed.finish == {0: "stop"}
    assert streamed.usage.completion_tokens == result.usage.completion_tokens


def test_earliest_of_several_stop_strings_wins(client, model_name):
    text = complete(client, model_name, ENGLISH, max_tokens=16).choices[0].text
    first, later = text[3:6], text[9:12]
    result = complete(client, model_name, ENGLISH, max_tokens=16, stop=[later, "\x01never", first])
    assert result.choices[0].text == text[: min(text.find(first), text.find(later))]
    assert result.choices[0].finish_reason == "stop"


def test_held_back_partial_stop_is_released_at_the_end(client, model_name):
    """The end of the text is the start of a stop string that never completes: it is held
    back while it might, and released when the generation ends."""
    text = complete(client, model_name, ENGLISH, max_tokens=12).choices[0].text
    stop = text[-3:] + "\x01\x02"
    result = complete(client, model_name, ENGLISH, max_tokens=12, stop=[stop])
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == "length"
    streamed = collect_completion_stream(complete(client, model_name, ENGLISH, max_tokens=12, stop=[stop], stream=True))
    assert streamed.text() == text and streamed.finish == {0: "length"}


def test_stop_string_in_the_echoed_prompt_does_not_stop(client, model_name):
    text = complete(client, model_name, ENGLISH, max_tokens=8).choices[0].text
    assert "upon" not in text
    result = complete(client, model_name, ENGLISH, max_tokens=8, echo=True, stop=["upon"])
    assert result.choices[0].text == ENGLISH + text
    assert result.choices[0].finish_reason == "length"


def test_chat_stop_string(client, model_name):
    first = collect_chat_stream(chat(client, model_name, user("Hi"), max_tokens=16, stream=True))
    text = first.text()
    stop = stop_in_the_middle(first.pieces[0])
    result = chat(client, model_name, user("Hi"), max_tokens=16, stop=stop)
    assert result.choices[0].message.content == text[: text.find(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = collect_chat_stream(chat(client, model_name, user("Hi"), max_tokens=16, stop=stop, stream=True))
    assert streamed.text() == text[: text.find(stop)] and streamed.finish == {0: "stop"}


# ---- seeds ----------------------------------------------------------------------------------


def test_same_seed_same_text_other_seed_other_text(client, model_name):
    texts = [
        complete(client, model_name, ENGLISH, max_tokens=16, temperature=1.0, seed=seed).choices[0].text
        for seed in (123, 123, 124)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    chats = [
        chat(client, model_name, user("Hi"), max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content
        for seed in (123, 123, 7)
    ]
    assert chats[0] == chats[1] != chats[2]


def test_seeded_requests_are_unaffected_by_concurrent_ones(server, model_name):
    seeded = dict(model=model_name, prompt=ENGLISH, max_tokens=16, temperature=1.0, seed=123)

    async def run():
        async with async_client(server) as aclient:
            alone = (await aclient.completions.create(**seeded)).choices[0].text
            others = [
                aclient.completions.create(model=model_name, prompt=p, max_tokens=m, temperature=t)
                for p, m, t in [
                    (CHINESE, 24, 1.0),
                    ("def fibonacci(n):", 8, 0),
                    ("The quick brown fox " * 8, 20, 0.7),
                    ("Hi", 5, 1.0),
                ]
            ]
            together = await asyncio.gather(
                aclient.completions.create(**seeded),
                *others,
                aclient.completions.create(**seeded),
                aclient.chat.completions.create(
                    model=model_name, messages=user("Hi"), max_tokens=10, temperature=1.0, seed=5
                ),
            )
            chat_alone = await aclient.chat.completions.create(
                model=model_name, messages=user("Hi"), max_tokens=10, temperature=1.0, seed=5
            )
            return alone, together, chat_alone

    alone, together, chat_alone = asyncio.run(run())
    assert together[0].choices[0].text == alone
    assert together[-2].choices[0].text == alone
    assert together[-1].choices[0].message.content == chat_alone.choices[0].message.content


# ---- async client ---------------------------------------------------------------------------


def test_async_client_streams_and_non_streams(server, client, model_name):
    expected_completion = complete(client, model_name, CHINESE, max_tokens=10).choices[0].text
    expected_chat = chat(client, model_name, user(CHINESE), max_tokens=10).choices[0].message.content

    async def run():
        async with async_client(server) as aclient:
            plain = await aclient.completions.create(model=model_name, prompt=CHINESE, max_tokens=10, temperature=0)
            pieces = []
            async for chunk in await aclient.completions.create(
                model=model_name, prompt=CHINESE, max_tokens=10, temperature=0, stream=True
            ):
                pieces.extend(c.text for c in chunk.choices)
            chat_plain = await aclient.chat.completions.create(
                model=model_name, messages=user(CHINESE), max_tokens=10, temperature=0
            )
            chat_pieces = []
            async for chunk in await aclient.chat.completions.create(
                model=model_name, messages=user(CHINESE), max_tokens=10, temperature=0, stream=True
            ):
                chat_pieces.extend(c.delta.content or "" for c in chunk.choices)
            return plain, pieces, chat_plain, chat_pieces

    plain, pieces, chat_plain, chat_pieces = asyncio.run(run())
    assert plain.choices[0].text == expected_completion
    assert_clean_pieces(pieces, expected_completion)
    assert chat_plain.choices[0].message.content == expected_chat
    assert_clean_pieces(chat_pieces, expected_chat)


# ---- /v1/chat/completions -------------------------------------------------------------------


def test_chat_fields_usage_and_zephyr_template(client, model_name, tokenizer):
    result = chat(client, model_name, user("Hi"), max_tokens=10)
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == model_name
    assert abs(result.created - time.time()) < 5
    (choice,) = result.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == n_tokens(tokenizer, ZEPHYR_HI)
    assert result.usage.completion_tokens == 10
    assert result.usage.total_tokens == result.usage.prompt_tokens + 10
    # The template's </s> is the EOS token, not the text "</s>".
    assert tokenizer(ZEPHYR_HI).input_ids.count(tokenizer.eos_token_id) == 1
    # Exactly that prompt: the chat answer is the completion of the rendered text.
    rendered = complete(client, model_name, ZEPHYR_HI, max_tokens=10)
    assert rendered.choices[0].text == choice.message.content
    assert rendered.usage.prompt_tokens == result.usage.prompt_tokens


def test_chat_system_and_multi_turn_messages(client, model_name, tokenizer):
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "你好"},
    ]
    rendered = (
        "<|system|>\nYou are brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\n你好</s>\n<|assistant|>\n"
    )
    result = chat(client, model_name, messages, max_tokens=8)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, rendered)
    assert result.choices[0].message.content == complete(client, model_name, rendered, max_tokens=8).choices[0].text


def test_chat_content_parts_and_max_completion_tokens(client, model_name, tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    result = client.chat.completions.create(model=model_name, messages=parts, temperature=0, max_completion_tokens=7)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, ZEPHYR_HI)
    assert result.usage.completion_tokens == 7
    assert (
        result.choices[0].message.content
        == chat(client, model_name, user("Hi"), max_tokens=7).choices[0].message.content
    )


@pytest.mark.parametrize("content", ["Hi", CHINESE, "绍兴 😀"])
def test_chat_stream_equals_non_stream(client, model_name, content):
    whole = chat(client, model_name, user(content), max_tokens=12)
    streamed = collect_chat_stream(
        chat(client, model_name, user(content), max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    text = whole.choices[0].message.content
    assert streamed.text() == text
    assert_clean_pieces(streamed.pieces[0], text)
    assert streamed.finish == {0: "length"}
    assert streamed.usage.model_dump() == whole.usage.model_dump()
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    (stream_id,) = streamed.ids
    assert stream_id.startswith("chatcmpl-")
    assert {c.object for c in streamed.chunks} == {"chat.completion.chunk"}


@pytest.fixture(scope="module")
def template_server(start_server, serving_dirs, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "marker.jinja"
    # bos_token first, as many HF templates write it: the server must not double BOS.
    template.write_text(
        "{{ bos_token }}[[MARKER]]{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    return start_server(
        *serving_dirs, "--max-batch-size", "2", "--max-model-len", "256", "--chat-template", str(template)
    )


def test_chat_template_flag(template_server, model_name, tokenizer):
    tclient = OpenAI(base_url=template_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    rendered = "[[MARKER]]SYSTEM: Be kind.\nUSER: Hi\nASSISTANT:"
    result = chat(tclient, model_name, messages, max_tokens=8)
    assert result.usage.prompt_tokens == n_tokens(tokenizer, rendered)
    assert result.choices[0].message.content == complete(tclient, model_name, rendered, max_tokens=8).choices[0].text
    zephyr = chat(tclient, model_name, user("Hi"), max_tokens=1)
    assert zephyr.usage.prompt_tokens == n_tokens(tokenizer, "[[MARKER]]USER: Hi\nASSISTANT:")


# ---- errors ---------------------------------------------------------------------------------


def assert_error_shape(
    error: openai.APIStatusError, status: int, kind: str, param: str | None = None, code: str | None = None
) -> dict:
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == kind
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert error.type == kind  # the SDK read the same body
    return body["error"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "gpt-4o", ENGLISH)
    assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "gpt-4o", user("Hi"), stream=True)
    assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")


@pytest.mark.parametrize(
    "published_name", ["OpenELM-3B-Instruct", "apple/OpenELM-3B-Instruct", "LLM-Research/OpenELM-3B-Instruct"]
)
def test_published_names_work_whatever_the_folder_is_called(client, model_name, published_name):
    # The test model's folder is not called OpenELM-3B-Instruct: the README's examples still work.
    assert model_name != "OpenELM-3B-Instruct"
    completion = complete(client, published_name, ENGLISH, max_tokens=2)
    assert completion.model == model_name
    assert chat(client, published_name, user("Hi"), max_tokens=2).model == model_name
    assert [m.id for m in client.models.list()] == [model_name]


def test_served_model_name_is_the_only_name(start_server, serving_dirs):
    server = start_server(*serving_dirs, "--served-model-name", "my-model", "--max-batch-size", "2")
    named = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    assert complete(named, "my-model", ENGLISH, max_tokens=2).model == "my-model"
    with pytest.raises(openai.NotFoundError) as caught:
        complete(named, "OpenELM-3B-Instruct", ENGLISH, max_tokens=2)
    assert (
        "'my-model'" in assert_error_shape(caught.value, 404, "not_found_error", "model", "model_not_found")["message"]
    )


BAD_COMPLETIONS = [
    (dict(temperature=-1), "temperature", None),
    (dict(n=17), "n", None),
    (dict(max_tokens=0), "max_tokens", None),
    (dict(top_p=-0.1), "top_p", None),
    (dict(top_p=1.5), "top_p", None),
    (dict(prompt="word " * 3000), "prompt", "context_length_exceeded"),
    (dict(prompt="hello " * 600), "prompt", "context_length_exceeded"),
    (dict(max_tokens=600), "max_tokens", "context_length_exceeded"),
    (dict(max_tokens=5000), "max_tokens", None),
    (dict(best_of=3), "best_of", None),
    (dict(logprobs=21), "logprobs", None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("override, param, code", BAD_COMPLETIONS, ids=[str(b[0])[:30] for b in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(client, model_name, override, param, code, stream):
    kwargs = dict(prompt=ENGLISH, max_tokens=8, temperature=0, stream=stream) | override
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, **kwargs)
    assert_error_shape(caught.value, 400, "invalid_request_error", param, code)


BAD_CHATS = [
    (dict(temperature=-1), "temperature"),
    (dict(n=17), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=-0.1), "top_p"),
    (dict(max_tokens=600), "max_tokens"),
    (dict(max_completion_tokens=600), "max_completion_tokens"),
    (dict(messages=user("word " * 3000)), "messages"),
    (dict(messages=[]), "messages"),
]


@pytest.mark.parametrize("override, param", BAD_CHATS, ids=[str(b[0])[:30] for b in BAD_CHATS])
def test_bad_chat_parameters_are_400(client, model_name, override, param):
    kwargs = dict(messages=user("Hi"), max_tokens=8, temperature=0) | override
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name, **kwargs)
    assert_error_shape(caught.value, 400, "invalid_request_error", param)


def test_bad_chat_role_is_400(server, model_name):
    response = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=30,
        json={"model": model_name, "messages": [{"role": "wizard", "content": "Hi"}]},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == ERROR_KEYS


def test_error_body_is_json_with_exact_shape(server, model_name):
    response = httpx.post(
        server.url + "/v1/completions", json={"model": model_name, "prompt": "Hi", "temperature": -1}, timeout=30
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == "temperature"
    assert error["type"] == "invalid_request_error"


# ---- queue full -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_server(start_server, serving_dirs):
    return start_server(*serving_dirs, "--max-batch-size", "1", "--max-queue", "1", "--max-model-len", "1024")


def test_queue_full_is_503_with_retry_after(busy_server, model_name):
    body = {"model": model_name, "prompt": ENGLISH, "max_tokens": 200, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(busy_server.url + "/v1/completions", json=body) for _ in range(5)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert set(error) == ERROR_KEYS
            assert error["type"] == "overloaded_error" and error["code"] == "queue_full"
        else:
            assert response.json()["usage"]["completion_tokens"] == 200
    assert wait_until_idle(busy_server, 30)


def test_queue_full_raises_the_sdk_internal_server_error(busy_server, model_name):
    body = {"model": model_name, "prompt": ENGLISH, "max_tokens": 400, "temperature": 0}
    bclient = OpenAI(base_url=busy_server.url + "/v1", api_key="x", max_retries=0, timeout=60)

    async def occupy_and_try():
        async with httpx.AsyncClient(timeout=120) as http:
            long_ones = []
            # One at a time: the first takes the only slot, the second the only queue place.
            for running, waiting in ((1, 0), (1, 1)):
                long_ones.append(asyncio.ensure_future(http.post(busy_server.url + "/v1/completions", json=body)))
                deadline = time.monotonic() + 10
                while not (
                    metric(busy_server, "openelm_requests_running") == running
                    and metric(busy_server, "openelm_requests_waiting") == waiting
                ):
                    assert time.monotonic() < deadline, "the slot and the queue never filled"
                    await asyncio.sleep(0.01)
            errors = []
            for stream in (False, True):
                try:
                    await asyncio.to_thread(complete, bclient, model_name, "Hi", max_tokens=4, stream=stream)
                except openai.InternalServerError as error:
                    errors.append(error)
            return errors, await asyncio.gather(*long_ones)

    errors, long_ones = asyncio.run(occupy_and_try())
    assert [r.status_code for r in long_ones] == [200, 200]
    assert len(errors) == 2, "both the plain and the streamed request should have been refused"
    for error in errors:
        assert_error_shape(error, 503, "overloaded_error", code="queue_full")
        assert error.response.headers["retry-after"] == "1"
    assert wait_until_idle(busy_server, 30)
    assert complete(bclient, model_name, "Hi", max_tokens=4).choices[0].finish_reason == "length"


# ---- the tutorial's POST / ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [ENGLISH, CHINESE])
def test_tutorial_stream_equals_non_stream(server, prompt):
    body = {"prompt": prompt, "max_new_tokens": 16}
    whole = requests.post(server.url + "/", json=body, timeout=60)
    assert whole.status_code == 200
    response = whole.json()["response"]
    assert response.startswith(prompt)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pieces = []
    with requests.post(server.url + "/", json={**body, "stream": True}, stream=True, timeout=60) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/plain")
        for chunk in streamed.iter_content(chunk_size=None):
            pieces.append(decoder.decode(chunk))
    pieces.append(decoder.decode(b"", final=True))
    assert "".join(pieces) == response
    assert_clean_pieces(pieces, response)


def test_tutorial_and_openai_routes_agree(server, client, model_name):
    response = requests.post(server.url + "/", json={"prompt": CHINESE, "max_new_tokens": 10}, timeout=60).json()
    text = complete(client, model_name, CHINESE, max_tokens=10).choices[0].text
    assert response["response"] == CHINESE + text


# ---- the incremental detokenizer, with the real tokenizer -----------------------------------


def detokenize_stepwise(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(token) for token in new_ids]
    pieces.append(detokenizer.flush())
    return pieces


def test_detokenizer_holds_back_byte_tokens_of_chinese(llama_tokenizer):
    text = "你好，请介绍一下你自己。绍"
    ids = llama_tokenizer(text).input_ids
    tokens = llama_tokenizer.convert_ids_to_tokens(ids)
    assert ["<0xE7>", "<0xBB>", "<0x8D>"] == tokens[-3:], tokens  # 绍 is three byte tokens
    pieces = detokenize_stepwise(llama_tokenizer, ids[:1], ids[1:])
    assert not [p for p in pieces if REPLACEMENT in p], pieces
    assert "".join(pieces) == llama_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert pieces[-4:] == ["", "", "绍", ""]
    # Pushed from nothing (BOS included) it is the same.
    assert "".join(detokenize_stepwise(llama_tokenizer, [], ids)) == text


@pytest.mark.parametrize("prompt", ["", "Once upon a time", "你好，", "Hi 😀"])
def test_detokenizer_continuation_after_a_prompt(llama_tokenizer, prompt):
    """After a prompt, the pieces are exactly what decoding prompt + continuation adds to the
    prompt's text (leading spaces included), and never show half a character."""
    prompt_ids = llama_tokenizer(prompt).input_ids
    for continuation in (" world 绍兴 😀 ok", "绍兴是一个美丽的城市。", " café ß €", "\n\tdef f():\n    return 1"):
        new_ids = llama_tokenizer(prompt + continuation).input_ids[len(prompt_ids) :]
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        prompt_text = llama_tokenizer.decode(prompt_ids, skip_special_tokens=True)
        assert whole.startswith(prompt_text)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert_clean_pieces(pieces, whole[len(prompt_text) :])


def test_detokenizer_random_mixtures(llama_tokenizer):
    rng = random.Random(1234)
    vocabulary = ["绍", "兴", "你好", "😀", "🦊", " the", " fox", "，", "。", "é", " ", "\n", "Ω", "語", "𝔘", "12"]
    prompt_ids = llama_tokenizer("Hello:").input_ids
    prompt_text = llama_tokenizer.decode(prompt_ids, skip_special_tokens=True)
    for _ in range(30):
        text = "".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
        new_ids = llama_tokenizer("Hello:" + text).input_ids[len(prompt_ids) :]
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert_clean_pieces(pieces, whole[len(prompt_text) :])


def test_detokenizer_invalid_bytes_still_join_to_the_whole_text(llama_tokenizer):
    """Stray byte tokens (as random weights make) never form a character: the pieces still
    join into the text decoded in one go."""
    byte = {
        f"<0x{b:02X}>": i for i, b in ((llama_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>"), b) for b in range(256))
    }
    prompt_ids = llama_tokenizer("x").input_ids
    world = llama_tokenizer(" world").input_ids[1:]
    sequences = [
        [byte["<0xE7>"]] + world,
        [byte["<0xE7>"], byte["<0xBB>"]],
        world + [byte["<0x8D>"]] + world,
        [byte["<0xF0>"], byte["<0x9F>"], byte["<0xE7>"], byte["<0xBB>"], byte["<0x8D>"]],
    ]
    for new_ids in sequences:
        whole = llama_tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
        assert "".join(pieces) == whole[len("x") :], (pieces, whole)


def test_detokenizer_skips_special_tokens(llama_tokenizer):
    prompt_ids = llama_tokenizer("Hi").input_ids
    new_ids = llama_tokenizer(" there").input_ids[1:] + [llama_tokenizer.eos_token_id]
    pieces = detokenize_stepwise(llama_tokenizer, prompt_ids, new_ids)
    assert "".join(pieces) == " there"


# ---- the stop-string matcher ----------------------------------------------------------------


def run_matcher(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out = [matcher.add(piece) for piece in pieces]
    out.append(matcher.finish())
    return out, matcher.stopped


def test_stop_string_across_several_pieces():
    out, stopped = run_matcher(("STOP",), ["abc S", "T", "O", "P tail", " more"])
    assert stopped and "".join(out) == "abc "
    assert out[0] == "abc ", "text that cannot start a stop string is released at once"
    assert not any("S" in piece for piece in out)


def test_stop_string_partial_match_is_released_when_it_fails():
    out, stopped = run_matcher(("STOP",), ["abc S", "T", "x", "yz"])
    assert not stopped
    assert out[:2] == ["abc ", ""]
    assert out[2] == "STx"
    assert "".join(out) == "abc STxyz"


def test_held_back_partial_stop_is_released_by_finish():
    out, stopped = run_matcher(("STOP",), ["abc", " ST"])
    assert not stopped
    assert out == ["abc", " ", "ST"]


def test_stop_string_inside_one_piece_and_nothing_after():
    out, stopped = run_matcher(("<end>",), ["hello<end>world", "more"])
    assert stopped and out == ["hello", "", ""]


def test_earliest_of_several_stop_strings():
    out, stopped = run_matcher(("world", "lo w", "xyz"), ["hel", "lo wo", "rld"])
    assert stopped and "".join(out) == "hel"


def test_overlapping_stop_prefixes():
    # "aab" after "aaa": the partial match must slide, not restart.
    out, stopped = run_matcher(("aab",), ["a", "a", "a", "b", "c"])
    assert stopped and "".join(out) == "a"
    out, stopped = run_matcher(("ab", "bc"), ["xa", "c"])
    assert not stopped and "".join(out) == "xac"


def test_stop_string_at_the_very_start():
    out, stopped = run_matcher(("He",), ["H", "ello"])
    assert stopped and out == ["", "", ""]


def test_chinese_stop_string_across_pieces():
    out, stopped = run_matcher(("介绍",), ["你好，请介", "绍一下"])
    assert stopped and "".join(out) == "你好，请"


def test_no_stop_strings_release_everything():
    out, stopped = run_matcher((), ["a", "b", ""])
    assert not stopped and out == ["a", "b", "", ""]


# ---- work nobody will read is cancelled -----------------------------------------------------


def test_refused_prompt_list_leaves_no_work_behind(busy_server, model_name):
    """A list whose later prompt finds the queue full is refused whole (503), and the prompts
    already queued are cancelled rather than generated for nobody."""
    assert wait_until_idle(busy_server, 30)
    for stream in (True, False):
        response = httpx.post(
            busy_server.url + "/v1/completions",
            timeout=60,
            json={
                "model": model_name,
                "prompt": [ENGLISH, "Hi", CHINESE],
                "max_tokens": 900,
                "temperature": 0,
                "stream": stream,
            },
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_full"
        assert wait_until_idle(busy_server, 1.0), f"stream={stream}: refused prompts are still generating"


def test_stream_closed_by_the_client_stops_generating(server, model_name):
    for path, body in (
        ("/v1/completions", {"prompt": ENGLISH}),
        ("/v1/chat/completions", {"messages": user("Hi")}),
        ("/", {"prompt": ENGLISH, "max_new_tokens": 480}),
    ):
        body = {"model": model_name, "max_tokens": 480, "temperature": 0, "stream": True, **body}
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_raw())
        assert wait_until_idle(server, 1.5), f"{path}: generation went on after the client left"


def test_non_streamed_request_abandoned_by_the_client_stops_generating(busy_server, model_name):
    """A client that gives up (timeout, closed tab) while a non-streamed answer is made: the
    generation is cancelled within a poll or two. Tried several times, since a cancellation
    that lands just as a token arrives is the case that goes wrong."""
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 1000, "temperature": 0}
    for attempt in range(12):
        assert wait_until_idle(busy_server, 30)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(busy_server.url + "/v1/completions", json=body, timeout=0.3)
        started = time.monotonic()
        # A poll or two, with room for a loaded machine; running to the end takes far longer.
        stopped = wait_until_idle(busy_server, 2.0)
        if not stopped:
            wait_until_idle(busy_server, 30)
        assert stopped, (
            f"attempt {attempt + 1}: the abandoned generation ran on for {time.monotonic() - started:.1f} s, to its end"
        )


# ---- small compatibility points -------------------------------------------------------------


def test_echo_returns_the_prompt_verbatim(client, model_name):
    """OpenAI's echo gives back the prompt as sent; Llama's tokenizer drops a leading space
    on the way through tokens, so a decoded prompt is not the prompt."""
    prompt = " leading space"
    text = complete(client, model_name, prompt, max_tokens=4).choices[0].text
    assert complete(client, model_name, prompt, max_tokens=4, echo=True).choices[0].text == prompt + text


def test_invalid_prompt_error_names_the_prompt_param(server, model_name):
    response = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": model_name, "prompt": ["fine", 5]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] in ("prompt", "prompt.1"), response.json()

"""/v1/models and /v1/completions with the official openai SDK (sync and async, streamed and not).

The model has random weights: texts are gibberish, but greedy decoding (temperature 0) is
deterministic, so streamed and non-streamed answers, echoes and prompt lists compare exactly."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests
from openai_helpers import (
    CHINESE,
    ENGLISH,
    PROMPTS,
    assert_clean_pieces,
    async_client,
    chat,
    collect_completion_stream,
    complete,
    n_tokens,
    user,
)


def test_models_lists_the_served_model(client, model_name, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    card = models.data[0]
    assert card.object == "model"
    assert isinstance(card.created, int) and card.created <= time.time() + 5
    assert card.owned_by
    raw = requests.get(server.url + "/v1/models", timeout=10).json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 512


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


def test_echo_returns_the_prompt_verbatim(client, model_name):
    """OpenAI's echo gives back the prompt as sent; Llama's tokenizer drops a leading space
    on the way through tokens, so a decoded prompt is not the prompt."""
    prompt = " leading space"
    text = complete(client, model_name, prompt, max_tokens=4).choices[0].text
    assert complete(client, model_name, prompt, max_tokens=4, echo=True).choices[0].text == prompt + text


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

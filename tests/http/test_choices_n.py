"""n choices per prompt on both OpenAI routes: seeded n is reproducible, streams interleave
choices and end each with exactly one finish_reason, usage counts the prompt once."""

from __future__ import annotations

import openai
import pytest

PROMPT = "Once upon a time there was"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def complete(app, **body) -> dict:
    return app.post_ok("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, **body})


def test_n_choices_share_the_prompt_and_usage_counts_it_once(app):
    result = complete(app, n=4, seed=11)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert len({c["text"] for c in result["choices"]}) > 1  # sampled with different seeds
    prompt_tokens = len(app.tokenizer(PROMPT).input_ids)
    assert result["usage"]["prompt_tokens"] == prompt_tokens
    assert result["usage"]["completion_tokens"] == 4 * 8
    assert result["usage"]["total_tokens"] == prompt_tokens + 32


def test_seeded_n_is_reproducible_and_choice_i_uses_seed_plus_i(app):
    first = complete(app, n=3, seed=40)
    again = complete(app, n=3, seed=40)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    for i, choice in enumerate(first["choices"]):
        assert complete(app, seed=40 + i)["choices"][0]["text"] == choice["text"]


def test_seed_near_the_top_of_the_range_wraps(app):
    result = complete(app, n=2, seed=2**64 - 1)
    assert result["choices"][1]["text"] == complete(app, seed=0)["choices"][0]["text"]


def test_greedy_n_gives_identical_choices(app):
    result = complete(app, n=3, temperature=0)
    assert len({c["text"] for c in result["choices"]}) == 1


def test_prompt_list_times_n_orders_choices_by_prompt(app):
    prompts = [PROMPT, "Hello"]
    result = complete(app, prompt=prompts, n=2, seed=5)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    singles = [complete(app, prompt=p, n=2, seed=5)["choices"] for p in prompts]
    assert [c["text"] for c in result["choices"]] == [c["text"] for choices in singles for c in choices]
    assert result["usage"]["prompt_tokens"] == sum(len(app.tokenizer(p).input_ids) for p in prompts)


def streamed_choices(chunks: list[dict], text_key) -> tuple[dict[int, str], dict[int, list[str]], dict | None]:
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            assert not finishes.get(choice["index"]), "a choice went on after its finish_reason"
            texts[choice["index"]] = texts.get(choice["index"], "") + (text_key(choice) or "")
            if choice["finish_reason"]:
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    return texts, finishes, usage


def test_completion_stream_interleaves_choices(app):
    body = {
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 1.0,
        "n": 3,
        "seed": 9,
        "stream_options": {"include_usage": True},
    }
    whole = app.post_ok("/v1/completions", body)
    chunks = app.stream("/v1/completions", body)
    texts, finishes, usage = streamed_choices(chunks, lambda c: c["text"])
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finishes == {i: ["length"] for i in range(3)}
    assert usage == whole["usage"]
    order = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert order != sorted(order), "choices are sent as they come, not one after the other"


def test_chat_n_streamed_and_not(app):
    body = {
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 1.0,
        "n": 2,
        "seed": 3,
        "stream_options": {"include_usage": True},
    }
    whole = app.post_ok("/v1/chat/completions", body)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    chunks = app.stream("/v1/chat/completions", body)
    texts, finishes, usage = streamed_choices(chunks, lambda c: c["delta"].get("content"))
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert finishes == {0: ["length"], 1: ["length"]}
    assert usage == whole["usage"]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]


def test_n_with_the_openai_sdk(app):
    async def call(client):
        completion = await client.completions.create(model=app.model, prompt=PROMPT, n=2, max_tokens=4, seed=1)
        chat = await client.chat.completions.create(model=app.model, messages=MESSAGES, n=3, max_tokens=4, seed=1)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=app.model, prompt=PROMPT, n=17, max_tokens=4)
        return completion, chat

    completion, chat = app.sdk(call)
    assert len(completion.choices) == 2 and len(chat.choices) == 3

"""Every combination, in SGLang's manner: echo x logprobs x n x (text | token ids) x stream on
/v1/completions, logprobs x n x stream on chat. For each: the right number of choices, exactly
one finish_reason per choice, usage right, logprobs of the right length, the stream equal to
the whole answer."""

from __future__ import annotations

import itertools

import pytest

PROMPT = "Once upon a time there was"
MAX_TOKENS = 5


def join_stream(chunks: list[dict], text_of, logprobs_of) -> tuple[dict, dict, dict, dict | None]:
    """Per choice: text, finish reasons, logprob entries; and the usage chunk."""
    texts, finishes, logprobs, usage = {}, {}, {}, None
    for chunk in chunks:
        if chunk.get("usage"):
            assert usage is None and chunk["choices"] == []
            usage = chunk["usage"]
            continue
        assert usage is None, "nothing may follow the usage chunk"
        for choice in chunk["choices"]:
            index = choice["index"]
            assert not finishes.get(index), f"choice {index} went on after its finish_reason"
            texts[index] = texts.get(index, "") + (text_of(choice) or "")
            logprobs.setdefault(index, []).extend(logprobs_of(choice))
            if choice["finish_reason"] is not None:
                finishes.setdefault(index, []).append(choice["finish_reason"])
    return texts, finishes, logprobs, usage


def completion_entries(choice: dict) -> list:
    if not choice["logprobs"]:
        return []
    return list(zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]))


def same_entries(streamed: list, whole: list) -> bool:
    return [t for t, _ in streamed] == [t for t, _ in whole] and all(
        (a is None and b is None) or abs(a - b) < 1e-4 for (_, a), (_, b) in zip(streamed, whole)
    )


@pytest.mark.parametrize(
    "echo, logprobs, n, as_ids", list(itertools.product([False, True], [None, 2], [1, 3], [False, True]))
)
def test_completion_matrix(app, echo, logprobs, n, as_ids):
    prompt_ids = app.tokenizer(PROMPT).input_ids
    body = {
        "prompt": prompt_ids if as_ids else PROMPT,
        "max_tokens": MAX_TOKENS,
        "n": n,
        "echo": echo,
        "logprobs": logprobs,
        "temperature": 1.0,
        "seed": 21,
        "ignore_eos": True,
    }
    response = app.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    whole = response.json()
    assert [c["index"] for c in whole["choices"]] == list(range(n))
    assert whole["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": n * MAX_TOKENS,
        "total_tokens": len(prompt_ids) + n * MAX_TOKENS,
    }
    for choice in whole["choices"]:
        assert choice["finish_reason"] == "length"
        if echo:
            assert choice["text"].startswith(PROMPT)
        if logprobs is None:
            assert choice["logprobs"] is None
        else:
            entries = completion_entries(choice)
            assert len(entries) == MAX_TOKENS + (len(prompt_ids) if echo else 0)
            assert (entries[0][1] is None) == echo

    chunks = app.stream("/v1/completions", {**body, "stream_options": {"include_usage": True}})
    texts, finishes, logprob_entries, usage = join_stream(chunks, lambda c: c["text"], completion_entries)
    assert finishes == {i: ["length"] for i in range(n)}
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert usage == whole["usage"]
    for choice in whole["choices"]:
        assert same_entries(logprob_entries[choice["index"]], completion_entries(choice))


def chat_entries(choice: dict) -> list:
    if not choice["logprobs"]:
        return []
    return [(entry["token"], entry["logprob"]) for entry in choice["logprobs"]["content"]]


@pytest.mark.parametrize("logprobs, n", list(itertools.product([False, True], [1, 3])))
def test_chat_matrix(app, logprobs, n):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": MAX_TOKENS,
        "n": n,
        "logprobs": logprobs,
        "top_logprobs": 2 if logprobs else None,
        "temperature": 1.0,
        "seed": 4,
        "ignore_eos": True,
    }
    response = app.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    whole = response.json()
    assert [c["index"] for c in whole["choices"]] == list(range(n))
    prompt_tokens = app.post("/tokenize", {"messages": body["messages"]}).json()["count"]
    assert whole["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n * MAX_TOKENS,
        "total_tokens": prompt_tokens + n * MAX_TOKENS,
    }
    for choice in whole["choices"]:
        assert len(chat_entries(choice)) == (MAX_TOKENS if logprobs else 0)

    chunks = app.stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    texts, finishes, logprob_entries, usage = join_stream(chunks, lambda c: c["delta"].get("content"), chat_entries)
    assert finishes == {i: ["length"] for i in range(n)}
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert usage == whole["usage"]
    for choice in whole["choices"]:
        assert same_entries(logprob_entries[choice["index"]], chat_entries(choice))

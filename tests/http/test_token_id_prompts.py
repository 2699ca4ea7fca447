"""/v1/completions prompts given as token ids (list[int] and list[list[int]]), as lm-eval and
vLLM clients send them: taken as sent, checked against the vocabulary."""

from __future__ import annotations

import pytest

PROMPT = "Once upon a time there was"


def complete(app, prompt, **body) -> dict:
    response = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_token_ids_answer_as_the_text_they_encode(app):
    ids = app.tokenizer(PROMPT).input_ids
    as_text = complete(app, PROMPT)
    as_ids = complete(app, ids)
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert as_ids["usage"] == as_text["usage"]


def test_lists_of_token_ids_give_one_choice_each(app):
    prompts = [PROMPT, "Hello world!", "你好"]
    ids = [app.tokenizer(p).input_ids for p in prompts]
    by_ids = complete(app, ids)
    by_text = complete(app, prompts)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert [c["index"] for c in by_ids["choices"]] == [0, 1, 2]
    assert by_ids["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


def test_token_ids_are_taken_as_sent_without_bos(app):
    """No BOS is added to token ids (as vLLM): the prompt counts exactly the ids sent."""
    ids = app.tokenizer(PROMPT).input_ids[1:]
    result = complete(app, ids, max_tokens=1)
    assert result["usage"]["prompt_tokens"] == len(ids)


def test_echo_of_token_ids_is_their_text(app):
    ids = app.tokenizer(PROMPT).input_ids
    result = complete(app, ids, echo=True, max_tokens=2)
    assert result["choices"][0]["text"].startswith(PROMPT)


def test_streamed_token_id_prompts(app):
    ids = [app.tokenizer(p).input_ids for p in (PROMPT, "Hello")]
    whole = complete(app, ids)
    chunks = app.stream("/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0})
    for index, choice in enumerate(whole["choices"]):
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index)
        assert streamed == choice["text"]


@pytest.mark.parametrize(
    "prompt, param",
    [
        ([1, 10**9], "prompt.1"),
        ([[1, 2], [1, 5, 10**6]], "prompt.1.2"),
        (["text", [1, 2]], None),
        ([1, -1], None),
        ([[]], None),
        ([], None),
        ([1, 2.5], None),
        ([1, True], None),
    ],
)
def test_bad_token_ids_are_400_naming_the_field(app, prompt, param):
    response = app.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith("prompt")
    if param is not None:
        assert error["param"] == param and param in error["message"]


def test_vocabulary_edge(app):
    vocab = app.app.state.gateway.vocab_size
    assert complete(app, [1, vocab - 1], max_tokens=1)["usage"]["prompt_tokens"] == 2
    response = app.post("/v1/completions", {"prompt": [1, vocab], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt.1"


def test_too_long_token_id_prompt_is_400(app):
    response = app.post("/v1/completions", {"prompt": [1] * 600, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"

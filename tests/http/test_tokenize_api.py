"""vLLM's extra routes that clients use: /tokenize (a prompt or chat messages), /detokenize, /version."""

from __future__ import annotations

import pytest

PROMPT = "Once upon a time there was"


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_tokenize_and_detokenize(app):
    tokens = app.post("/tokenize", {"prompt": PROMPT}).json()
    assert tokens["tokens"] == app.tokenizer(PROMPT).input_ids
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert tokens["token_strs"] is None
    bare = app.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == tokens["tokens"][1:]
    assert bare["token_strs"] == app.tokenizer.convert_ids_to_tokens(bare["tokens"])
    assert app.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}


def test_tokenize_messages_counts_what_chat_prefills(app):
    tokens = app.post("/tokenize", {"messages": MESSAGES}).json()
    chat = app.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()
    assert tokens["count"] == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, "model"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens.1"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_tokenize_requests(app, path, body, param):
    response = app.post(path, body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_version(app):
    response = app.request("GET", "/version")
    assert response.status_code == 200 and isinstance(response.json()["version"], str)

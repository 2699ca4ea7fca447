"""Log-probabilities on /v1/completions and /v1/chat/completions, streamed and not, with echo
(the prompt's logprobs) and max_tokens 0: in-process, on a tiny random model.

Random weights make gibberish, but logprobs are checked for what they must be whatever the
weights: the chosen token's, the greedy token the most likely, the shapes OpenAI clients parse.
"""

from __future__ import annotations

import math

import pytest

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def tokenizer(app):
    return app.tokenizer


def complete(app, **body) -> dict:
    response = app.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat(app, **body) -> dict:
    response = app.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, **body},
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response, param: str, text: str = "") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def check_completion_logprobs(logprobs: dict, tokens: int, k: int, greedy: bool) -> None:
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(logprobs[key]) == tokens for key in logprobs)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and math.isfinite(logprob)
        # The k most likely, plus the chosen token when it is not among them.
        assert top[token] == logprob and k <= len(top) <= k + 1
        if greedy:
            assert logprob == pytest.approx(max(top.values()), abs=1e-6)


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_completion_logprobs_per_generated_token(app, k):
    result = complete(app, logprobs=k)
    choice = result["choices"][0]
    check_completion_logprobs(choice["logprobs"], result["usage"]["completion_tokens"], k, greedy=True)
    # Offsets point into the text: each token's text starts where its offset says.
    for token, offset in zip(choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]):
        if not token.startswith("bytes:"):
            assert choice["text"][offset:].startswith(token.lstrip(" ")) or offset == len(choice["text"])


def test_no_logprobs_unless_asked(app):
    assert complete(app)["choices"][0]["logprobs"] is None
    assert complete(app, logprobs=None)["choices"][0]["logprobs"] is None
    assert chat(app)["choices"][0]["logprobs"] is None
    assert chat(app, logprobs=False)["choices"][0]["logprobs"] is None


def test_sampled_token_logprob_is_the_chosen_one(app):
    result = complete(app, logprobs=3, temperature=1.5, seed=7, max_tokens=12)
    check_completion_logprobs(result["choices"][0]["logprobs"], 12, 3, greedy=False)


def test_logprobs_are_the_models_before_sampling_adjustments(app):
    """Temperature, penalties and top-p change what is picked, never the reported distribution."""
    plain = complete(app, logprobs=5, max_tokens=1)["choices"][0]["logprobs"]
    adjusted = complete(
        app, logprobs=5, max_tokens=1, temperature=0.3, top_p=0.5, seed=1, presence_penalty=2, repetition_penalty=1.5
    )["choices"][0]["logprobs"]
    assert adjusted["top_logprobs"][0] == pytest.approx(plain["top_logprobs"][0], abs=1e-5)


def test_streamed_logprobs_equal_the_whole_answer(app):
    whole = complete(app, logprobs=2, max_tokens=10)["choices"][0]
    chunks = app.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 2})
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        if choice["logprobs"]:
            for key in joined:
                joined[key] += choice["logprobs"][key]
    assert joined["tokens"] == whole["logprobs"]["tokens"]
    assert joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_echo_gives_the_prompt_logprobs_first_token_null(app, tokenizer):
    prompt_ids = tokenizer(PROMPT).input_ids
    result = complete(app, logprobs=1, echo=True, max_tokens=3)
    logprobs = result["choices"][0]["logprobs"]
    assert result["choices"][0]["text"].startswith(PROMPT)
    assert len(logprobs["tokens"]) == len(prompt_ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"][0] == 0
    assert all(v <= 0 for v in logprobs["token_logprobs"][1:])
    assert [t.strip() for t in logprobs["tokens"][1 : len(prompt_ids)]] == [
        tokenizer.convert_ids_to_tokens(i).replace("\u2581", " ").strip() for i in prompt_ids[1:]
    ]
    # The generated tokens' offsets continue after the echoed prompt.
    assert logprobs["text_offset"][len(prompt_ids)] == len(PROMPT)


def test_lm_eval_loglikelihood_request(app, tokenizer):
    """Exactly what lm-eval's local-completions sends for loglikelihood: token ids, echo,
    one generated token; it reads token_logprobs[ctxlen:-1] and top_logprobs."""
    ids = tokenizer(PROMPT).input_ids
    body = {"prompt": [ids], "logprobs": 1, "echo": True, "max_tokens": 1, "temperature": 0, "seed": 1234}
    response = app.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    assert logprobs["token_logprobs"][0] is None
    ctxlen = 3
    for token, logprob, top in zip(
        logprobs["tokens"][ctxlen:-1], logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1]
    ):
        assert top[token] == logprob and max(top.values()) >= logprob


def test_max_tokens_zero_with_echo_generates_nothing(app, tokenizer):
    prompt_ids = tokenizer(PROMPT).input_ids
    result = complete(app, logprobs=0, echo=True, max_tokens=0)
    choice = result["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids)
    assert result["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 0,
        "total_tokens": len(prompt_ids),
    }
    chunks = app.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    streamed = [
        lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]
    ]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_prompt_logprobs_do_not_depend_on_the_batch(app):
    """A prompt scored alone and in a batch of prompts (padded to the longest) scores the same."""
    alone = complete(app, logprobs=0, echo=True, max_tokens=0)["choices"][0]["logprobs"]["token_logprobs"]
    batch = complete(app, prompt=["Hi", PROMPT, "你好，请介绍一下你自己。"], logprobs=0, echo=True, max_tokens=0)
    assert batch["choices"][1]["logprobs"]["token_logprobs"][1:] == pytest.approx(alone[1:], abs=1e-4)


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"logprobs": 21}, "logprobs", ""),
        ({"logprobs": -1}, "logprobs", ""),
        ({"logprobs": True}, "logprobs", ""),
        ({"max_tokens": 0}, "max_tokens", "echo"),
        ({"max_tokens": -1, "echo": True}, "max_tokens", ""),
    ],
)
def test_bad_completion_logprobs_requests(app, body, param, text):
    assert_error(app.post("/v1/completions", {"prompt": PROMPT, **body}), param, text)


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"logprobs": 2}, "logprobs", ""),
        ({"max_tokens": 0}, "max_tokens", ""),
    ],
)
def test_bad_chat_logprobs_requests(app, body, param, text):
    assert_error(
        app.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **body}), param, text
    )


@pytest.mark.parametrize("k", [0, 3])
def test_chat_logprobs_content(app, k, tokenizer):
    result = chat(app, logprobs=True, top_logprobs=k, max_tokens=8)
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == k
        assert entry["logprob"] <= 0
        if not entry["token"].startswith("bytes:"):
            assert bytes(entry["bytes"]) == entry["token"].encode()
        if k:
            assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy
            assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
                (t["logprob"] for t in entry["top_logprobs"]), reverse=True
            )
    # The tokens' bytes make the answer (SentencePiece's leading space aside).
    joined = b"".join(bytes(entry["bytes"]) for entry in content).decode("utf-8", errors="replace")
    assert joined.strip() == result["choices"][0]["message"]["content"].strip()


def test_chat_stream_logprobs_equal_the_whole_answer(app):
    whole = chat(app, logprobs=True, top_logprobs=2, max_tokens=8)["choices"][0]["logprobs"]["content"]
    chunks = app.stream(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    streamed = [
        entry
        for c in chunks
        for choice in c["choices"]
        if choice["logprobs"]
        for entry in choice["logprobs"]["content"]
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    # The second request may reuse the first's cached prompt blocks and run in another batch
    # shape: float32 sums in another order differ around the fifth decimal (1.6e-5 seen).
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole], abs=1e-4)


def test_byte_tokens_show_as_bytes(app):
    """A byte-fallback token that is not a whole character: OpenAI's "bytes:\\xNN" and its byte."""
    gateway = app.app.state.gateway
    byte_id = gateway.tokenizer.convert_tokens_to_ids("<0xE4>")
    assert gateway.token_text(byte_id) == ("bytes:\\xe4", b"\xe4")
    newline_id = gateway.tokenizer.convert_tokens_to_ids("<0x0A>")
    assert gateway.token_text(newline_id) == ("\n", b"\n")


def test_logprobs_with_the_openai_sdk(app):
    async def call(client):
        completion = await client.completions.create(
            model=app.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True
        )
        chat_completion = await client.chat.completions.create(
            model=app.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )
        return completion, chat_completion

    completion, chat_completion = app.sdk(call)
    assert completion.choices[0].logprobs.token_logprobs[0] is None
    assert len(completion.choices[0].logprobs.top_logprobs[-1]) >= 2
    content = chat_completion.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)

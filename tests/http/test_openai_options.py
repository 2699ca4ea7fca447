"""What real OpenAI and vLLM clients send beyond the basics: explicit nulls, top_p 0,
logit_bias, ignore_eos, min_tokens, models.retrieve, HEAD /health; and what stays unsupported
gets a 400 that says so, never silently ignored. (/tokenize and friends: test_tokenize_api.py.)"""

from __future__ import annotations

import gzip
import json

import openai
import pytest

PROMPT = "Once upon a time there was"
MESSAGES = [{"role": "user", "content": "Hi"}]


def complete(app, **body) -> dict:
    response = app.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def assert_400(response, param: str, text: str = "") -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error
    return error


NULLABLE = [
    "model",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "stream",
    "stream_options",
    "user",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "logprobs",
    "response_format",
    "tools",
    "tool_choice",
]


def test_explicit_null_for_every_optional_field(app):
    completion = app.post(
        "/v1/completions", {"prompt": PROMPT, **dict.fromkeys(NULLABLE + ["echo", "best_of", "suffix"])}
    )
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 1
    chat = app.post(
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 4, **dict.fromkeys(NULLABLE + ["max_completion_tokens", "top_logprobs"])},
    )
    assert chat.status_code == 200, chat.text


def test_sdk_passing_none_and_logprobs_false(app):
    async def call(client):
        return await client.chat.completions.create(
            model=app.model,
            messages=MESSAGES,
            max_tokens=4,
            n=None,
            presence_penalty=None,
            frequency_penalty=None,
            stream=None,
            logprobs=False,
            temperature=0,
        )

    assert app.sdk(call).choices[0].logprobs is None


def test_top_p_zero_is_greedy(app):
    greedy = complete(app)["choices"][0]["text"]
    assert complete(app, temperature=1.0, top_p=0, seed=3)["choices"][0]["text"] == greedy
    assert complete(app, temperature=1.0, top_p=0)["choices"][0]["text"] == greedy


def test_logit_bias_steers_greedy_and_sampled_answers(app):
    token = app.tokenizer.convert_tokens_to_ids("\u2581time")
    forced = complete(app, logit_bias={str(token): 100})
    assert app.tokenizer(forced["choices"][0]["text"], add_special_tokens=False).input_ids == [token] * 6
    forced_sampled = complete(app, logit_bias={str(token): 100}, temperature=1, seed=1)
    assert forced_sampled["choices"][0]["text"] == forced["choices"][0]["text"]
    first = complete(app, max_tokens=1, logprobs=0)["choices"][0]["logprobs"]["tokens"][0]
    first_id = app.tokenizer.convert_tokens_to_ids(first.replace(" ", "\u2581"))
    banned = complete(app, max_tokens=1, logprobs=0, logit_bias={str(first_id): -100})
    assert banned["choices"][0]["logprobs"]["tokens"][0] != first


@pytest.mark.parametrize(
    "bias, param",
    [
        ({"abc": 1}, "logit_bias.abc"),
        ({"-1": 1}, "logit_bias.-1"),
        ({"999999999": 1}, "logit_bias.999999999"),
        ({"5": 101}, "logit_bias.5"),
        ({"5": "1"}, "logit_bias.5"),
    ],
)
def test_bad_logit_bias_is_400(app, bias, param):
    assert_400(app.post("/v1/completions", {"prompt": PROMPT, "logit_bias": bias}), param)


def eos_first(app) -> dict:
    """A logit bias that makes EOS the best token at every step."""
    return {str(app.tokenizer.eos_token_id): 100}


def test_ignore_eos_and_min_tokens(app):
    stopped = complete(app, logit_bias=eos_first(app))
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    ignored = complete(app, logit_bias=eos_first(app), ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 6
    held = complete(app, logit_bias=eos_first(app), min_tokens=4)
    assert held["choices"][0]["finish_reason"] == "stop" and held["usage"]["completion_tokens"] == 5
    chat = app.post(
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logit_bias": eos_first(app), "min_tokens": 3},
    ).json()
    assert chat["usage"]["completion_tokens"] == 4


def test_min_tokens_lets_stop_strings_through(app):
    text = complete(app, max_tokens=8)["choices"][0]["text"]
    stop = text[:2]
    assert complete(app, max_tokens=8, stop=stop)["choices"][0]["text"] == ""
    held = complete(app, max_tokens=8, stop=stop, min_tokens=8)["choices"][0]
    assert held["text"] == text and held["finish_reason"] == "length"


def test_min_tokens_above_max_tokens_is_400(app):
    assert_400(app.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "min_tokens": 4}), "min_tokens")


def test_models_retrieve(app):
    async def call(client):
        card = await client.models.retrieve(app.model)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("gpt-4o")
        return card, caught.value

    card, error = app.sdk(call)
    assert card.id == app.model and card.object == "model"
    assert error.status_code == 404 and error.body["code"] == "model_not_found"


def test_head_health(app):
    response = app.request("HEAD", "/health")
    assert response.status_code == 200 and response.content == b""


def test_gzip_body_is_415_not_a_utf8_error(app):
    body = gzip.compress(json.dumps({"prompt": PROMPT}).encode())
    response = app.request(
        "POST",
        "/v1/completions",
        content=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "Content-Encoding gzip is not supported" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("/v1/chat/completions", "functions", [{"name": "f"}]),
        ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("/v1/chat/completions", "modalities", ["text", "audio"]),
        ("/v1/completions", "suffix", "the end"),
    ],
)
def test_unsupported_fields_are_refused_not_ignored(app, path, field, value):
    body = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": PROMPT}
    assert_400(app.post(path, {**body, field: value}), field, "not supported")


@pytest.mark.parametrize(
    "field, value",
    [("response_format", {"type": "text"}), ("tool_choice", "none"), ("tools", []), ("modalities", ["text"])],
)
def test_harmless_values_of_unsupported_fields_are_accepted(app, field, value):
    response = app.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text


def test_best_of_equal_to_n_only(app):
    assert complete(app, n=2, best_of=2, temperature=1)["choices"][1]["index"] == 1
    assert_400(app.post("/v1/completions", {"prompt": PROMPT, "best_of": 3}), "best_of", "not supported")

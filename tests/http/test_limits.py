"""Limits on what a request may ask: body size (by Content-Length and chunked), prompt tokens
and max_tokens, each a 4xx in the route's error shape."""

from __future__ import annotations

import json

import httpx
import pytest
import requests
from http_checks import BODIES, assert_error, assert_openai_error, assert_tutorial_error, chat, completion, tutorial
from in_process import ServerThread


@pytest.fixture(scope="module")
def small_limits_server(serving_dirs):
    flags = (
        "--max-body-bytes",
        "4096",
        "--max-prompt-tokens",
        "200",
        "--max-tokens-limit",
        "100",
        "--max-batch-size",
        "2",
        "--max-model-len",
        "512",
    )
    with ServerThread(*serving_dirs, *flags) as server:
        yield server


def padded_body(path: str, size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes: whitespace after the JSON object pads it."""
    raw = json.dumps(BODIES[path](n=2)).encode()
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize("path", list(BODIES))
def test_body_over_the_limit_is_413_with_content_length(small_limits_server, path):
    url = small_limits_server.url + path
    at_limit = requests.post(
        url, data=padded_body(path, 4096), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert at_limit.status_code == 200, at_limit.text
    over = requests.post(url, data=padded_body(path, 4097), headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(path, over, 413)
    assert over.headers.get("x-request-id")
    huge = requests.post(url, data=b"x" * 5_000_000, headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(path, huge, 413)


@pytest.mark.parametrize("path", list(BODIES))
def test_body_over_the_limit_is_413_when_chunked(small_limits_server, path):
    url = small_limits_server.url + path

    def chunks(raw: bytes, size: int = 1000):
        for start in range(0, len(raw), size):
            yield raw[start : start + size]

    with httpx.Client(timeout=30) as client:
        under = client.post(url, content=chunks(padded_body(path, 4000)), headers={"Content-Type": "application/json"})
        assert under.request.headers.get("transfer-encoding") == "chunked"
        assert under.status_code == 200, under.text
        over = client.post(url, content=chunks(padded_body(path, 4097)), headers={"Content-Type": "application/json"})
        assert over.request.headers.get("transfer-encoding") == "chunked"
        assert_error(path, over, 413)
        endless = client.post(url, content=chunks(b"[" * 200_000, 8192), headers={"Content-Type": "application/json"})
        assert_error(path, endless, 413)
    assert requests.get(small_limits_server.url + "/health", timeout=10).status_code == 200


def test_prompt_over_max_prompt_tokens_is_400(small_limits_server):
    url = small_limits_server.url
    long_prompt = "hello " * 300  # ~300 tokens, under the 4096-byte body limit
    short_prompt = "hello " * 30  # under 200 tokens with any tokenizer, the tests' own included
    assert_openai_error(
        requests.post(url + "/v1/completions", json=completion(long_prompt), timeout=30),
        400,
        code="context_length_exceeded",
        param="prompt",
    )
    assert_openai_error(
        requests.post(url + "/v1/completions", json=completion(["hi", long_prompt]), timeout=30),
        400,
        code="context_length_exceeded",
        param="prompt.1",
    )
    assert_openai_error(
        requests.post(url + "/v1/chat/completions", json=chat(long_prompt), timeout=30),
        400,
        code="context_length_exceeded",
        param="messages",
    )
    assert_tutorial_error(requests.post(url + "/", json=tutorial(long_prompt), timeout=30), 400)
    assert requests.post(url + "/v1/completions", json=completion(short_prompt, 2), timeout=30).status_code == 200
    assert requests.post(url + "/", json=tutorial(short_prompt, 2), timeout=30).status_code == 200


def test_max_tokens_over_the_limit_is_400(small_limits_server):
    url = small_limits_server.url
    assert_openai_error(
        requests.post(url + "/v1/completions", json=completion(n=101), timeout=30), 400, param="max_tokens"
    )
    assert_openai_error(
        requests.post(url + "/v1/chat/completions", json=chat(n=101), timeout=30), 400, param="max_tokens"
    )
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 101}
    assert_openai_error(
        requests.post(url + "/v1/chat/completions", json=body, timeout=30), 400, param="max_completion_tokens"
    )
    assert_tutorial_error(requests.post(url + "/", json=tutorial(n=101), timeout=30), 400)
    assert_tutorial_error(requests.post(url + "/", json={"prompt": "Hi", "max_length": 300}, timeout=30), 400)
    ok = requests.post(url + "/v1/completions", json=completion(n=100), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 100

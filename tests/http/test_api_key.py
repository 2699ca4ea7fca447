"""--api-key / API_KEY: every route but /health needs the key, compared whole, in the route's
error shape; the openai SDK sees a 401 as AuthenticationError."""

from __future__ import annotations

import openai
import pytest
import requests
from http_checks import assert_error, assert_openai_error, assert_tutorial_error, bearer, chat, completion, tutorial
from in_process import ServerThread

API_KEY = "s3cret-key-0123456789"
WRONG_KEY = "s3cret-key-0123456780"  # same length, last character differs
ENV_KEY = "env-key-abcdef"


@pytest.fixture(scope="module")
def key_server(serving_dirs):
    with ServerThread(*serving_dirs, "--api-key", API_KEY, "--max-batch-size", "2", "--max-model-len", "256") as server:
        yield server


@pytest.fixture(scope="module")
def env_key_server(serving_dirs):
    """The key from the environment only."""
    flags = ("--max-batch-size", "1", "--max-model-len", "128")
    with ServerThread(*serving_dirs, *flags, env={"API_KEY": ENV_KEY}) as server:
        yield server


GUARDED = [
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", completion()),
    ("POST", "/v1/chat/completions", chat()),
    ("POST", "/", tutorial()),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no-such-route", None),
    ("GET", "/v1/no-such-route", None),
]


@pytest.mark.parametrize("method,path,body", GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
def test_api_key_guards_every_route_but_health(key_server, method, path, body):
    url = key_server.url + path
    for headers in (
        {},
        bearer(WRONG_KEY),
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
        bearer(API_KEY[:-1]),
        bearer(API_KEY + "x"),
        bearer(""),
    ):
        response = requests.request(method, url, json=body, headers=headers, timeout=30)
        assert_error(path, response, 401)
        assert response.headers.get("x-request-id")
        if path.startswith("/v1"):
            assert response.json()["error"]["type"] == "authentication_error"
    response = requests.request(method, url, json=body, headers=bearer(API_KEY), timeout=30)
    assert response.status_code == (404 if "no-such-route" in path else 200), response.text


def test_api_key_leaves_health_open(key_server):
    for headers in ({}, bearer(WRONG_KEY), bearer(API_KEY)):
        response = requests.get(key_server.url + "/health", headers=headers, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "ok"


def test_api_key_with_the_openai_sdk(key_server):
    wrong = openai.OpenAI(base_url=key_server.url + "/v1", api_key=WRONG_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="openelm-tiny", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="openelm-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 401
    right = openai.OpenAI(base_url=key_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    model = right.models.list().data[0].id
    answer = right.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_api_key_from_the_environment(env_key_server):
    url = env_key_server.url
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert_openai_error(requests.get(url + "/v1/models", timeout=10), 401)
    assert_tutorial_error(requests.post(url + "/", json=tutorial(), timeout=10), 401)
    assert_openai_error(requests.get(url + "/v1/models", headers=bearer(WRONG_KEY), timeout=10), 401)
    assert requests.get(url + "/v1/models", headers=bearer(ENV_KEY), timeout=10).status_code == 200
    assert requests.post(url + "/", json=tutorial(n=2), headers=bearer(ENV_KEY), timeout=30).status_code == 200

"""A full queue: 503 with Retry-After in each route's error shape, also through the openai SDK;
the requests already admitted are served, and a prompt list refused in part leaves no work behind."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import requests
from http_checks import assert_openai_error, assert_tutorial_error, gauges, long_stream, tutorial, wait_for, wait_idle
from http_checks import chat as chat_body
from http_checks import completion as completion_body
from in_process import ServerThread
from openai import OpenAI
from openai_helpers import CHINESE, ENGLISH, ERROR_KEYS, assert_error_shape, complete, wait_until_idle


@pytest.fixture(scope="module")
def busy_server(serving_dirs):
    """One slot and one waiting place."""
    with ServerThread(*serving_dirs, "--max-batch-size", "1", "--max-queue", "1", "--max-model-len", "2048") as server:
        yield server


def test_full_queue_is_503_with_retry_after_on_every_route(busy_server, model_name):
    url = busy_server.url
    sdk = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with httpx.Client(timeout=60) as client:
        # One at a time: the first takes the only slot, the second the only queue place.
        running = long_stream(client, url, "tutorial", 1500)
        assert wait_for(lambda: gauges(url) == (1.0, 0.0), 10), gauges(url)
        waiting = long_stream(client, url, "chat", 1500)
        assert wait_for(lambda: gauges(url) == (1.0, 1.0), 10), gauges(url)
        try:
            refused = requests.post(url + "/", json=tutorial(n=2), timeout=30)
            assert_tutorial_error(refused, 503)
            assert refused.headers["retry-after"] == "1"
            for path, body in (
                ("/v1/completions", completion_body(n=2)),
                ("/v1/chat/completions", chat_body(n=2, stream=True)),
            ):
                refused = requests.post(url + path, json=body, timeout=30)
                error = assert_openai_error(refused, 503, code="queue_full")
                assert error["type"] == "overloaded_error"
                assert refused.headers["retry-after"] == "1"
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as caught:
                    complete(sdk, model_name, "Hi", max_tokens=4, stream=stream)
                assert_error_shape(caught.value, 503, "overloaded_error", code="queue_full")
                assert caught.value.response.headers["retry-after"] == "1"
        finally:
            running.close()
            waiting.close()
    assert wait_idle(url, 10), gauges(url)
    assert requests.post(url + "/", json=tutorial(n=2), timeout=30).status_code == 200
    assert complete(sdk, model_name, "Hi", max_tokens=4).choices[0].finish_reason == "length"


def test_a_burst_is_answered_in_full_or_refused(busy_server, model_name):
    """Five at once on one slot and one queue place: each is a 503 or a whole answer."""
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

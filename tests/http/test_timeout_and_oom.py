"""Requests the engine cannot finish: --request-timeout and out of memory in a step are a 503
(or an error event once a stream has started), and the server goes on serving."""

from __future__ import annotations

import time

import pytest
import requests
import torch
from http_checks import (
    assert_openai_error,
    assert_tutorial_error,
    chat,
    completion,
    gauges,
    scrape,
    sse_events,
    tutorial,
    value,
    wait_idle,
)
from in_process import ServerThread

OOM_SEED = 4_242_424_242  # requests with this seed hit an injected OutOfMemoryError in prefill


@pytest.fixture(scope="module")
def failing_server(serving_dirs):
    """A one-second request timeout; steps that read the prompt of a request seeded OOM_SEED raise
    torch.OutOfMemoryError, as a CUDA OOM would."""
    flags = ("--request-timeout", "1", "--max-batch-size", "4", "--max-model-len", "2048")
    with ServerThread(*serving_dirs, *flags) as server:
        runner = server.engine.core.runner
        run = runner.run

        def run_out_of_memory_in_prefill(scheduled, wanted):
            # Any step that reads its prompt: with prefix caching, the prompt may start past 0.
            if any(s.request.params.seed == OOM_SEED and s.start < len(s.request.prompt_ids) for s in scheduled):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the tests)")
            return run(scheduled, wanted)

        runner.run = run_out_of_memory_in_prefill
        yield server


def test_request_timeout_is_503(failing_server):
    url = failing_server.url  # --request-timeout 1; 1500 tokens take several seconds here
    start = time.monotonic()
    assert_tutorial_error(requests.post(url + "/", json=tutorial(n=1500), timeout=60), 503)
    assert time.monotonic() - start < 5
    assert_openai_error(
        requests.post(url + "/v1/completions", json=completion(n=1500), timeout=60), 503, code="timeout"
    )
    with requests.post(url + "/v1/chat/completions", json=chat(n=1500, stream=True), stream=True, timeout=60) as r:
        assert r.status_code == 200  # the answer had started; the stream ends with an error event
        events = sse_events(r.text)
    assert isinstance(events[-1], dict) and events[-1]["error"]["code"] == "timeout", events[-3:]
    assert "[DONE]" not in events
    assert wait_idle(url, 5), gauges(url)
    assert requests.post(url + "/", json=tutorial(n=4), timeout=30).status_code == 200


def test_out_of_memory_over_http_is_503_and_the_server_goes_on(failing_server):
    url = failing_server.url
    response = requests.post(url + "/v1/completions", json=completion(n=4, seed=OOM_SEED), timeout=30)
    error = assert_openai_error(response, 503)
    assert error["type"] == "overloaded_error" and "memory" in error["message"]
    assert response.headers.get("retry-after", "").isdigit()
    response = requests.post(url + "/", json=tutorial(n=4, seed=OOM_SEED, do_sample=True), timeout=30)
    assert_tutorial_error(response, 503)
    assert response.headers.get("retry-after", "").isdigit()
    with requests.post(
        url + "/v1/chat/completions", json=chat(n=4, seed=OOM_SEED, stream=True), stream=True, timeout=30
    ) as r:
        events = sse_events(r.text)
    assert events[-1]["error"]["type"] == "overloaded_error", events
    ok = requests.post(url + "/v1/completions", json=completion(n=4, seed=7), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert "out of memory in a step" in failing_server.log()
    samples = scrape(url)
    assert value(samples, "openelm_requests_running") == 0 and value(samples, "openelm_kv_cache_usage_ratio") == 0

"""Work nobody will read is cancelled: streams the client closes and non-streamed requests it
gives up on stop generating within a step or two, queued ones included.

Against ``python api.py``: these tests time how soon the engine stops, and in the test process
its thread would share the interpreter with the client that measures it."""

from __future__ import annotations

import time

import httpx
import pytest
import requests
from http_checks import chat, completion, gauges, long_stream, tutorial, wait_for, wait_idle


@pytest.fixture(scope="module")
def long_server(start_server, serving_dirs):
    """Long generations (1500 tokens take > 4 s on a CPU) on 8 slots."""
    flags = ("--max-batch-size", "8", "--max-queue", "64", "--max-model-len", "2048")
    return start_server(*serving_dirs, *flags, env={"API_KEY": ""})


def test_dropped_streams_are_cancelled(long_server):
    url = long_server.url  # 8 slots; 1500 tokens each take > 4 s
    kinds = ["tutorial", "chat", "completions"]
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        streams = [long_stream(client, url, kinds[i % 3], 1500) for i in range(20)]
        # The engine admits the queued requests at its next steps, not at once.
        assert wait_for(lambda: gauges(url) == (8, 12), 10), gauges(url)
        for response in streams:
            response.close()
    assert wait_idle(url, 4), gauges(url)
    assert requests.post(url + "/", json=tutorial(n=4), timeout=30).status_code == 200
    assert requests.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "path,body",
    [
        ("/", tutorial("Once upon a time", 1500)),
        ("/v1/completions", completion(["Once upon a time", "In a galaxy"], 1500)),
        ("/v1/chat/completions", chat("Tell me a long story", 1500)),
    ],
    ids=["tutorial", "completions", "chat"],
)
@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_client_timeout_cancels_a_non_streaming_request(long_server, path, body, attempt):
    """Repeated: a cancellation that lands just as a token arrives is the case that goes wrong
    (it was lost in a race once in four attempts or so), and then the request runs to its end
    (> 4 s here)."""
    url = long_server.url
    assert wait_idle(url, 10)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url + path, json=body, timeout=(5, 0.5))
    assert wait_idle(url, 3), (
        f"still generating {time.monotonic() - started:.1f} s after the client left: {gauges(url)}"
    )

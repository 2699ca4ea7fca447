"""Request bodies for the three generating routes, their error shapes, /metrics read with
prometheus_client, and streams held open, for the HTTP tests of limits, keys and load."""

from __future__ import annotations

import json
import re
import time

import httpx
import requests
from prometheus_client.parser import text_string_to_metric_families


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    response = requests.get(url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def gauges(url: str, headers: dict | None = None) -> tuple[float, float]:
    samples = scrape(url, headers)
    return value(samples, "openelm_requests_running"), value(samples, "openelm_requests_waiting")


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def wait_idle(url: str, timeout: float, headers: dict | None = None) -> bool:
    return wait_for(lambda: gauges(url, headers) == (0.0, 0.0), timeout)


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def assert_tutorial_error(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "status", "time"}, body
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"]), body
    return body


def assert_error(path: str, response, status: int, **kw):
    if path.startswith("/v1"):
        return assert_openai_error(response, status, **kw)
    return assert_tutorial_error(response, status)


def tutorial(prompt: str = "Hello", n: int = 4, **extra) -> dict:
    return {"prompt": prompt, "max_new_tokens": n, **extra}


# Greedy, as the tutorial route is: a sampled answer may meet EOS early and end a long
# generation these tests need.
def completion(prompt="Hello", n: int = 4, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, **extra}


def chat(content: str = "Hello", n: int = 4, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0, **extra}


BODIES = {"/": tutorial, "/v1/completions": completion, "/v1/chat/completions": chat}


def sse_events(text: str) -> list:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class OpenStream:
    """A streaming response with its first chunk read, held open until ``close()``. (The chunk
    iterator is kept: dropping a half-read httpx iterator closes the connection.)"""

    def __init__(self, response: httpx.Response):
        assert response.status_code == 200, response.read()
        self.response = response
        self.chunks = response.iter_raw()
        self.first = next(self.chunks)
        assert self.first

    def close(self) -> None:
        self.response.close()


def long_stream(client: httpx.Client, url: str, kind: str, n: int, headers: dict | None = None) -> OpenStream:
    """Open a streaming request that answers a first chunk at once (before the engine has
    produced anything, so also while it waits for a slot) and read that chunk."""
    if kind == "tutorial":
        path, body = "/", tutorial("Once upon a time", n, stream=True)
    elif kind == "chat":
        path, body = "/v1/chat/completions", chat("Tell me a long story", n, stream=True)
    else:
        path, body = "/v1/completions", completion("Once upon a time", n, stream=True, echo=True)
    return OpenStream(client.send(client.build_request("POST", url + path, json=body, headers=headers), stream=True))

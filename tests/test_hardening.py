"""Production hardening, tested against live servers (``python api.py`` on 127.0.0.1).

API key, /metrics, body/prompt/token/queue/time limits, request ids and logging, CORS,
cancellation of abandoned requests, graceful shutdown on SIGTERM/SIGINT, and out-of-memory
recovery (in-process engine, and over HTTP with an injected OOM).

The servers this module needs are started together (in parallel) by the ``fleet`` fixture;
the tests that need no special flag use conftest's shared ``server``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]

API_KEY = "s3cret-key-0123456789"
WRONG_KEY = "s3cret-key-0123456780"  # same length, last character differs
ENV_KEY = "env-key-abcdef"
ALLOWED_ORIGIN = "http://a.example"
OTHER_ORIGIN = "http://b.example"
OOM_SEED = 4_242_424_242  # requests with this seed hit an injected OutOfMemoryError in prefill
SHUTDOWN_TIMEOUT = 10.0
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# Imported by the "failing" server (PYTHONPATH) before api.py runs: any prefill step that holds a
# request seeded with OOM_SEED raises torch.OutOfMemoryError, as a CUDA OOM would.
OOM_SITECUSTOMIZE = textwrap.dedent("""
    import os
    if os.environ.get("OPENELM_TEST_OOM_SEED"):
        import torch
        from openelm_server.engine import runner as _runner

        _magic = int(os.environ["OPENELM_TEST_OOM_SEED"])
        _original_run = _runner.ModelRunner.run

        def _run(self, scheduled, wanted):
            if any(s.request.params.seed == _magic and s.start == 0 for s in scheduled):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the tests)")
            return _original_run(self, scheduled, wanted)

        _runner.ModelRunner.run = _run
""")


# ---- helpers ----------------------------------------------------------------------------------


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


# ---- the servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(start_server, serving_dirs, tmp_path_factory):
    """Every specially-flagged server of this module, started in parallel."""
    model_dir, tokenizer_dir = serving_dirs
    site_dir = tmp_path_factory.mktemp("oom-site")
    (site_dir / "sitecustomize.py").write_text(OOM_SITECUSTOMIZE)
    no_key = {"API_KEY": ""}
    oom_env = {
        **no_key,
        "OPENELM_TEST_OOM_SEED": str(OOM_SEED),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site_dir), str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    specs = {
        # API key by flag, on all interfaces (no warning expected), CORS for one origin.
        "key": (
            [
                "--api-key",
                API_KEY,
                "--host",
                "0.0.0.0",
                "--cors-origins",
                ALLOWED_ORIGIN,
                "--max-batch-size",
                "2",
                "--max-model-len",
                "256",
            ],
            no_key,
        ),
        # API key from the environment only.
        "envkey": (["--max-batch-size", "1", "--max-model-len", "128"], {"API_KEY": ENV_KEY}),
        # All interfaces without a key (warning expected), small limits, prompts shortened in logs.
        "open": (
            [
                "--host",
                "0.0.0.0",
                "--no-log-prompts",
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
            ],
            no_key,
        ),
        "queue": (["--max-batch-size", "1", "--max-queue", "1", "--max-model-len", "2048"], no_key),
        # One-second request timeout; prefill steps of requests seeded OOM_SEED run out of memory.
        "failing": (["--request-timeout", "1", "--max-batch-size", "4", "--max-model-len", "2048"], oom_env),
        # Long generations (1500 tokens take > 4 s on a CPU): cancellation.
        "long": (["--max-batch-size", "8", "--max-queue", "64", "--max-model-len", "2048"], no_key),
        "sigterm": (
            ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-batch-size", "2", "--max-model-len", "1024"],
            no_key,
        ),
        "sigint": (
            ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-batch-size", "2", "--max-model-len", "1024"],
            no_key,
        ),
    }
    servers = {
        name: start_server(model_dir, tokenizer_dir, *flags, env=env, wait=False)
        for name, (flags, env) in specs.items()
    }
    for server in servers.values():
        server.wait_ready(timeout=180)
    return servers


# ---- API key ---------------------------------------------------------------------------------

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
def test_api_key_guards_every_route_but_health(fleet, method, path, body):
    url = fleet["key"].url + path
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


def test_api_key_leaves_health_open(fleet):
    for headers in ({}, bearer(WRONG_KEY), bearer(API_KEY)):
        response = requests.get(fleet["key"].url + "/health", headers=headers, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == "ok"


def test_api_key_with_the_openai_sdk(fleet):
    wrong = openai.OpenAI(base_url=fleet["key"].url + "/v1", api_key=WRONG_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="openelm-tiny", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="openelm-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 401
    right = openai.OpenAI(base_url=fleet["key"].url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    model = right.models.list().data[0].id
    answer = right.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_api_key_from_the_environment(fleet):
    url = fleet["envkey"].url
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert_openai_error(requests.get(url + "/v1/models", timeout=10), 401)
    assert_tutorial_error(requests.post(url + "/", json=tutorial(), timeout=10), 401)
    assert_openai_error(requests.get(url + "/v1/models", headers=bearer(WRONG_KEY), timeout=10), 401)
    assert requests.get(url + "/v1/models", headers=bearer(ENV_KEY), timeout=10).status_code == 200
    assert requests.post(url + "/", json=tutorial(n=2), headers=bearer(ENV_KEY), timeout=30).status_code == 200


def test_warning_when_listening_on_all_interfaces_without_a_key(fleet):
    assert "without an API key" in fleet["open"].log()
    assert "without an API key" not in fleet["key"].log()  # also on 0.0.0.0, but with a key


# ---- /metrics --------------------------------------------------------------------------------


def test_metrics_are_prometheus_text_and_count_what_happened(server):
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["openelm_http_requests"].type == "counter"
    for name in ("openelm_requests_waiting", "openelm_requests_running", "openelm_kv_cache_usage_ratio"):
        assert families[name].type == "gauge", name
    for name in (
        "openelm_time_to_first_token_seconds",
        "openelm_time_per_output_token_seconds",
        "openelm_e2e_request_latency_seconds",
    ):
        assert families[name].type == "histogram", name
    assert families["openelm_prompt_tokens"].type == "counter"
    assert families["openelm_generation_tokens"].type == "counter"

    before = scrape(server.url)
    assert requests.post(server.url + "/", json=tutorial(n=8), timeout=60).status_code == 200
    assert requests.post(server.url + "/", json=tutorial(n=0), timeout=60).status_code == 400
    usage = requests.post(server.url + "/v1/completions", json=completion(n=5), timeout=60).json()["usage"]
    with requests.post(server.url + "/v1/chat/completions", json=chat(n=5, stream=True), stream=True, timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in r.text
    assert requests.get(server.url + "/no-such-route-" + uuid.uuid4().hex, timeout=10).status_code == 404
    after = scrape(server.url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("openelm_http_requests_total", route="/", status="200") >= 1
    assert delta("openelm_http_requests_total", route="/", status="400") >= 1
    assert delta("openelm_http_requests_total", route="/v1/completions", status="200") >= 1
    assert delta("openelm_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    # Unknown paths share one label value: no label per path a scanner tries.
    assert delta("openelm_http_requests_total", route="other", status="404") >= 1
    assert not any(labels and dict(labels).get("route", "").startswith("/no-such-route") for _, labels in after)
    assert delta("openelm_prompt_tokens_total") >= usage["prompt_tokens"] + 2
    assert delta("openelm_generation_tokens_total") >= 8 + usage["completion_tokens"] + 5
    for name in (
        "openelm_time_to_first_token_seconds",
        "openelm_time_per_output_token_seconds",
        "openelm_e2e_request_latency_seconds",
    ):
        assert delta(name + "_count") >= 3, name
        assert delta(name + "_sum") > 0, name
    assert value(after, "openelm_requests_running") == 0
    assert value(after, "openelm_requests_waiting") == 0
    assert 0 <= value(after, "openelm_kv_cache_usage_ratio") <= 1


# ---- limits ----------------------------------------------------------------------------------


def padded_body(path: str, size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes (an ignored 'user' field pads it)."""
    body = dict(BODIES[path](n=2), user="")
    raw = json.dumps(body).encode()
    body["user"] = "x" * (size - len(raw))
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


@pytest.mark.parametrize("path", list(BODIES))
def test_body_over_the_limit_is_413_with_content_length(fleet, path):
    url = fleet["open"].url + path
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
def test_body_over_the_limit_is_413_when_chunked(fleet, path):
    url = fleet["open"].url + path

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
    assert requests.get(fleet["open"].url + "/health", timeout=10).status_code == 200


def test_prompt_over_max_prompt_tokens_is_400(fleet):
    url = fleet["open"].url
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


def test_max_tokens_over_the_limit_is_400(fleet):
    url = fleet["open"].url
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


def test_full_queue_is_503_with_retry_after(fleet):
    url = fleet["queue"].url  # one slot, one waiting place
    with httpx.Client(timeout=60) as client:
        running = long_stream(client, url, "tutorial", 1500)
        assert wait_for(lambda: gauges(url) == (1.0, 0.0), 10), gauges(url)
        waiting = long_stream(client, url, "chat", 1500)
        assert wait_for(lambda: gauges(url) == (1.0, 1.0), 10), gauges(url)
        try:
            refused = requests.post(url + "/", json=tutorial(n=2), timeout=30)
            assert_tutorial_error(refused, 503)
            assert refused.headers.get("retry-after", "").isdigit()
            refused = requests.post(url + "/v1/completions", json=completion(n=2), timeout=30)
            error = assert_openai_error(refused, 503, code="queue_full")
            assert error["type"] == "overloaded_error"
            assert refused.headers.get("retry-after", "").isdigit()
            refused = requests.post(url + "/v1/chat/completions", json=chat(n=2, stream=True), timeout=30)
            assert_openai_error(refused, 503, code="queue_full")
            assert refused.headers.get("retry-after", "").isdigit()
        finally:
            running.close()
            waiting.close()
    assert wait_idle(url, 10), gauges(url)
    assert requests.post(url + "/", json=tutorial(n=2), timeout=30).status_code == 200


def test_request_timeout_is_503(fleet):
    url = fleet["failing"].url  # --request-timeout 1; 1500 tokens take several seconds here
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


# ---- request ids and logs --------------------------------------------------------------------


def test_every_response_has_a_request_id(server):
    responses = [
        requests.get(server.url + "/health", timeout=10),
        requests.get(server.url + "/metrics", timeout=10),
        requests.get(server.url + "/v1/models", timeout=10),
        requests.post(server.url + "/", json=tutorial(n=2), timeout=30),
        requests.post(server.url + "/", json={"prompt": 5}, timeout=30),
        requests.post(server.url + "/v1/completions", data=b"{", timeout=30),
        requests.get(server.url + "/nope", timeout=10),
        requests.put(server.url + "/", timeout=10),
        requests.post(server.url + "/", json=tutorial(n=2, stream=True), timeout=30),
        requests.post(server.url + "/v1/chat/completions", json=chat(n=2, stream=True), timeout=30),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and all(VALID_REQUEST_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def log_lines_with(server, request_id: str) -> list[str]:
    return [line for line in server.log().splitlines() if f"[{request_id}]" in line]


def test_client_request_id_is_echoed_and_logged(server):
    rid = f"client-{uuid.uuid4().hex}:1.a_b"
    response = requests.post(
        server.url + "/", json=tutorial("Request id test", 3), headers={"X-Request-ID": rid}, timeout=30
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    lines = wait_for(lambda: [line for line in log_lines_with(server, rid) if "openelm_server.access" in line], 5)
    assert lines and '"POST /" 200' in lines[0]
    assert any("openelm_server.tutorial" in line and "Request id test" in line for line in log_lines_with(server, rid))

    rid = "x" * 128  # the longest accepted
    response = requests.post(
        server.url + "/v1/chat/completions", json=chat(n=2, stream=True), headers={"X-Request-ID": rid}, timeout=30
    )
    assert response.headers["x-request-id"] == rid
    assert wait_for(lambda: log_lines_with(server, rid), 5)

    rid = f"stream-{uuid.uuid4().hex}"
    response = requests.post(
        server.url + "/", json=tutorial("Streamed id test", 3, stream=True), headers={"X-Request-ID": rid}, timeout=30
    )
    assert response.headers["x-request-id"] == rid
    assert wait_for(lambda: any("openelm_server.tutorial" in line for line in log_lines_with(server, rid)), 5)


@pytest.mark.parametrize(
    "given",
    ["a" * 129, "has space", "semi;colon", "<script>", 'quote"d', "caf\u00e9", "", "../../etc/passwd", "a,b", "{json}"],
)
def test_invalid_request_ids_are_replaced(server, given):
    response = requests.get(server.url + "/health", headers={"X-Request-ID": given.encode("latin-1")}, timeout=10)
    assert response.status_code == 200
    replaced = response.headers["x-request-id"]
    assert replaced != given and VALID_REQUEST_ID.fullmatch(replaced)


def test_the_tutorial_log_line(server):
    prompt = f"Log line test {uuid.uuid4().hex}"
    body = requests.post(server.url + "/", json=tutorial(prompt, 5), timeout=30).json()
    expected = f'[{body["time"]}] ", prompt:"{prompt}", response:"{body["response"]!r}"'
    assert wait_for(lambda: expected in server.log(), 5), expected


def test_no_log_prompts_shortens_long_prompts(fleet):
    server = fleet["open"]  # --no-log-prompts
    marker = uuid.uuid4().hex
    prompt = f"{marker} " + "a long prompt that should not be logged in full " * 3
    body = requests.post(server.url + "/", json=tutorial(prompt, 4), timeout=30).json()
    log = wait_for(lambda: (text := server.log()) and f"…({len(prompt)} chars)" in text and text, 5)
    assert log, server.log()[-2000:]
    assert f'prompt:"{prompt[:60]}…({len(prompt)} chars)"' in log
    assert prompt not in log and body["response"] not in log
    short = f"short {uuid.uuid4().hex[:8]}"
    requests.post(server.url + "/", json=tutorial(short, 2), timeout=30)
    assert wait_for(lambda: f'prompt:"{short}"' in server.log(), 5)


# ---- CORS ------------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> requests.Response:
    return requests.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )


def test_cors_is_off_by_default(server):
    for path in ("/", "/v1/chat/completions"):
        assert "access-control-allow-origin" not in preflight(server.url + path, ALLOWED_ORIGIN).headers
    response = requests.get(server.url + "/health", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in response.headers
    response = requests.post(server.url + "/", json=tutorial(n=2), headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_exactly_the_configured_origin(fleet):
    url = fleet["key"].url
    allowed = preflight(url + "/v1/chat/completions", ALLOWED_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in preflight(url + "/v1/chat/completions", OTHER_ORIGIN).headers
    assert "access-control-allow-origin" not in preflight(url + "/", "http://a.example.evil.com").headers

    response = requests.post(
        url + "/v1/chat/completions", json=chat(n=2), headers={**bearer(API_KEY), "Origin": ALLOWED_ORIGIN}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in response.headers.get("access-control-expose-headers", "").lower()
    response = requests.get(url + "/health", headers={"Origin": OTHER_ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_on_errors_answered_by_the_guard(fleet):
    """A browser page on an allowed origin must be able to read a 401 / 413 (else it sees an
    opaque network error instead of 'missing or invalid API key')."""
    url = fleet["key"].url
    response = requests.post(
        url + "/v1/chat/completions", json=chat(n=2), headers={"Origin": ALLOWED_ORIGIN}, timeout=30
    )
    assert response.status_code == 401
    assert response.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN


# ---- cancellation ----------------------------------------------------------------------------


def test_dropped_streams_are_cancelled(fleet):
    url = fleet["long"].url  # 8 slots; 1500 tokens each take > 4 s
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
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_client_timeout_cancels_a_non_streaming_request(fleet, path, body, attempt):
    """Repeated: the cancellation can be lost in a race (one attempt in four or so, see the
    report on generation.py's wait_for), and then the request runs to its end (> 4 s here)."""
    url = fleet["long"].url
    assert wait_idle(url, 10)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url + path, json=body, timeout=(5, 0.5))
    assert wait_idle(url, 3), (
        f"still generating {time.monotonic() - started:.1f} s after the client left: {gauges(url)}"
    )


# ---- graceful shutdown -----------------------------------------------------------------------


@pytest.mark.parametrize("name,sig", [("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)])
def test_graceful_shutdown(fleet, name, sig):
    server = fleet[name]
    result: dict = {}

    def in_flight():
        # Long enough to be running when the signal comes, short enough to drain within the
        # shutdown window on a busy 2-core machine (a tiny model's step there can take 40 ms).
        try:
            result["response"] = requests.post(server.url + "/", json=tutorial("Once upon a time", 150), timeout=60)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            result["error"] = error

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert wait_for(lambda: gauges(server.url)[0] == 1, 10)
    started = time.monotonic()
    server.process.send_signal(sig)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
            return False
        except OSError:
            return True

    assert wait_for(refused, 3, interval=0.02), "the server still accepts connections after the signal"
    thread.join(timeout=SHUTDOWN_TIMEOUT + 5)
    assert "error" not in result, result
    response = result["response"]
    assert response.status_code == 200, response.text
    assert len(response.json()["response"]) > len("Once upon a time")
    returncode = server.process.wait(timeout=SHUTDOWN_TIMEOUT + 5)
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT
    assert returncode == 0, f"exit status {returncode} after {sig.name}:\n{server.log()[-1500:]}"


# ---- out of memory ---------------------------------------------------------------------------


def make_engine(serving_dirs, **config):
    from openelm_server.engine.async_engine import Engine
    from openelm_server.engine.config import EngineConfig
    from openelm_server.model.loader import load_openelm
    from openelm_server.tokenizer import load_tokenizer

    model_dir, tokenizer_dir = serving_dirs
    return Engine(
        load_openelm(model_dir, show_progress=False),
        load_tokenizer(tokenizer_dir),
        EngineConfig(**{"max_model_len": 128, "max_batch_size": 2, **config}),
    )


async def drain(stream) -> tuple[list[int], str | None, object]:
    tokens, finish, error = [], None, None
    async for event in stream:
        tokens += event.token_ids
        finish = event.finish_reason
        error = event.error
    return tokens, finish, error


@pytest.mark.parametrize("failing_call", [1, 2], ids=["prefill", "decode"])
def test_out_of_memory_fails_only_that_step_and_is_retryable(serving_dirs, failing_call):
    from openelm_server.engine.sampling import SamplingParams

    engine = make_engine(serving_dirs)
    forward = engine.model.forward
    calls = {"n": 0}

    def forward_with_one_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(*args, **kwargs)

    engine.model.forward = forward_with_one_oom
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def main():
        # Queued before the engine starts: the first two share the first step, the third waits.
        first = [engine.generate([1, 50, 60, 70], params) for _ in range(2)]
        third = engine.generate([1, 50], params)
        engine.start()
        failed = await asyncio.gather(*(drain(s) for s in first))
        waited = await drain(third)
        later = await asyncio.gather(*(drain(engine.generate([1, 80, 90], params)) for _ in range(2)))
        return failed, waited, later

    try:
        failed, waited, later = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    for tokens, finish, error in failed:
        assert error is not None and error.retryable, (tokens, finish, error)
        assert finish is None
        assert len(tokens) == failing_call - 1  # the prefill's token, if that step went through
    for tokens, finish, error in [waited, *later]:
        assert error is None and finish == "length" and len(tokens) == 6
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_bad_sampling_values_fail_only_their_own_request(serving_dirs):
    """A request's own sampling parameters (here a temperature so small it overflows the logits)
    must not take down the requests it happens to share a step with."""
    from openelm_server.engine.sampling import SamplingParams

    engine = make_engine(serving_dirs, max_batch_size=4)

    async def main():
        good = engine.generate([1, 50, 60, 70], SamplingParams(max_new_tokens=4, ignore_eos=True))
        bad = engine.generate([1, 50], SamplingParams(max_new_tokens=4, temperature=1e-300, seed=1))
        engine.start()
        return await asyncio.gather(drain(good), drain(bad))

    try:
        (good_tokens, good_finish, good_error), _ = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert good_error is None, f"an innocent request failed with its batch-mate: {good_error}"
    assert good_finish == "length" and len(good_tokens) == 4


def test_out_of_memory_over_http_is_503_and_the_server_goes_on(fleet):
    url = fleet["failing"].url
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
    assert "out of memory in a step" in fleet["failing"].log()
    samples = scrape(url)
    assert value(samples, "openelm_requests_running") == 0 and value(samples, "openelm_kv_cache_usage_ratio") == 0

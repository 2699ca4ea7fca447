"""SIGTERM and SIGINT to ``python api.py``: it stops accepting at once, finishes the request in
flight within --shutdown-timeout, and exits with status 0."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
import requests
from http_checks import completion, gauges, tutorial, wait_for

SHUTDOWN_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def fleet(start_server, serving_dirs):
    """One server per signal, started in parallel."""
    flags = ("--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-batch-size", "2", "--max-model-len", "1024")
    servers = {
        name: start_server(*serving_dirs, *flags, env={"API_KEY": ""}, wait=False) for name in ("sigterm", "sigint")
    }
    for server in servers.values():
        server.wait_ready(timeout=180)
    return servers


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


def test_a_request_outliving_the_shutdown_timeout_gets_a_json_503(start_server, serving_dirs):
    """uvicorn cancels what still runs at --shutdown-timeout, which its client would see as a bare
    500; the server ends it a second earlier with the engine's retryable error instead."""
    timeout = 3.0
    flags = ("--shutdown-timeout", str(timeout), "--max-batch-size", "2", "--max-model-len", "2048")
    server = start_server(*serving_dirs, *flags, env={"API_KEY": ""})
    result: dict = {}

    def in_flight():
        # Far longer than the shutdown window (a tiny model's 2,000 tokens take many seconds).
        body = completion("Once upon a time", 2000, ignore_eos=True)
        result["response"] = requests.post(server.url + "/v1/completions", json=body, timeout=60)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert wait_for(lambda: gauges(server.url)[0] == 1, 10)
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=timeout + 10)
    response = result["response"]
    assert response.status_code == 503, response.text
    assert "shutting down" in response.json()["error"]["message"]
    assert server.process.wait(timeout=timeout + 10) == 0

"""Request ids and the log: every answer carries an X-Request-ID (the client's when valid), log
lines carry it, the access line gives an error's reason, and --no-log-prompts shortens prompts."""

from __future__ import annotations

import re
import uuid

import pytest
import requests
from http_checks import chat, tutorial, wait_for
from in_process import ServerThread

VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


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
    assert any("openelm_server.legacy" in line and "Request id test" in line for line in log_lines_with(server, rid))

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
    assert wait_for(lambda: any("openelm_server.legacy" in line for line in log_lines_with(server, rid)), 5)


@pytest.mark.parametrize(
    "given",
    ["a" * 129, "has space", "semi;colon", "<script>", 'quote"d', "caf\u00e9", "", "../../etc/passwd", "a,b", "{json}"],
)
def test_invalid_request_ids_are_replaced(server, given):
    response = requests.get(server.url + "/health", headers={"X-Request-ID": given.encode("latin-1")}, timeout=10)
    assert response.status_code == 200
    replaced = response.headers["x-request-id"]
    assert replaced != given and VALID_REQUEST_ID.fullmatch(replaced)


def test_access_log_gives_the_reason_of_an_error(server):
    response = requests.post(server.url, json={"prompt": 3}, timeout=30)
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]

    # The access line is written once the response has gone out, so it may follow the client's read.
    def access_lines():
        return [line for line in log_lines_with(server, request_id) if "openelm_server.access" in line]

    access = wait_for(access_lines, 10)
    assert len(access) == 1
    assert '"POST /" 400' in access[0] and "(prompt: Input should be a valid string)" in access[0]


def test_request_id_comes_before_the_tutorial_line(server):
    response = requests.post(server.url, json={"prompt": "where is my id?", "max_new_tokens": 2}, timeout=60)
    request_id = response.headers["x-request-id"]
    [line] = [line for line in server.log().splitlines() if "where is my id?" in line]
    assert line.index(f"[{request_id}]") < line.index('", prompt:"where is my id?"')


@pytest.fixture(scope="module")
def quiet_server(serving_dirs):
    with ServerThread(*serving_dirs, "--no-log-prompts", "--max-batch-size", "2", "--max-model-len", "512") as server:
        yield server


def test_no_log_prompts_shortens_long_prompts(quiet_server):
    server = quiet_server
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

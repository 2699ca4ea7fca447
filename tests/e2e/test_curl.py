"""The wire format as curl sees it: raw server-sent events of both OpenAI routes and the
tutorial's POST / exactly as its curl line is written (a curl process; the server in-process)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import requests
from openai_helpers import CHINESE, user


def curl_sse(url: str, body: dict, tmp_path: Path) -> tuple[str, list[str]]:
    """POST with ``curl -N``; the response headers and the raw SSE events."""
    headers = tmp_path / "headers.txt"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "--max-time",
            "60",
            "-D",
            str(headers),
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
            url,
        ],
        capture_output=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    raw = done.stdout.decode("utf-8")
    assert raw.endswith("\n\n"), repr(raw[-200:])
    return headers.read_text(), raw[:-2].split("\n\n")


def parse_events(events: list[str]) -> list[dict]:
    assert events[-1] == "data: [DONE]"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payloads.append(json.loads(event[len("data: ") :]))
    return payloads


def test_raw_sse_with_curl(server, model_name, tmp_path):
    body = {
        "model": model_name,
        "prompt": CHINESE,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers, events = curl_sse(server.url + "/v1/completions", body, tmp_path)
    assert re.search(r"^content-type: text/event-stream", headers, re.IGNORECASE | re.MULTILINE), headers
    payloads = parse_events(events)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 10
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]][-1] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])
    streamed = "".join(p["choices"][0]["text"] for p in payloads[:-1])
    plain = requests.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert streamed == plain["choices"][0]["text"]
    assert payloads[-1]["usage"] == plain["usage"]


def test_raw_chat_sse_with_curl(server, model_name, tmp_path):
    body = {"model": model_name, "messages": user(CHINESE), "max_tokens": 10, "temperature": 0, "stream": True}
    headers, events = curl_sse(server.url + "/v1/chat/completions", body, tmp_path)
    assert re.search(r"^content-type: text/event-stream", headers, re.IGNORECASE | re.MULTILINE), headers
    payloads = parse_events(events)
    assert all(p["object"] == "chat.completion.chunk" and len(p["choices"]) == 1 for p in payloads)
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads)
    plain = requests.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_curl_as_in_the_tutorial(server):
    for extra in ([], ["-H", "Content-Type: application/json"]):
        output = subprocess.run(
            ["curl", "-s", "-X", "POST", server.url, *extra, "-d", '{"prompt": "你好"}'],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        body = json.loads(output)
        assert body["status"] == 200 and body["response"].startswith("你好")

"""Calling the OpenAI API as its clients do, for the HTTP tests: prompts, the official SDK with
greedy defaults, streams collected by choice, error shapes, and the server's load from /metrics."""

from __future__ import annotations

import re
import time

import openai
import requests
from openai import AsyncOpenAI

REPLACEMENT = "\ufffd"


ENGLISH = "Once upon a time there was"


CHINESE = "你好，请介绍一下你自己。"


PROMPTS = [ENGLISH, CHINESE, "def fibonacci(n):", "绍兴是一个美丽的城市。"]


ZEPHYR_HI = "<|user|>\nHi</s>\n<|assistant|>\n"


ERROR_KEYS = {"message", "type", "param", "code"}


def async_client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def complete(client, model, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def chat(client, model, messages, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Streamed:
    """What a stream of completion chunks said, by choice index."""

    def __init__(self):
        self.pieces: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage = None
        self.ids: set[str] = set()
        self.chunks = []

    def text(self, index: int = 0) -> str:
        return "".join(self.pieces.get(index, []))


def _collect(stream, pieces_of) -> Streamed:
    """Chunks of a stream by choice; ``pieces_of(chunk)`` gives (index, text or None, finish_reason)."""
    out = Streamed()
    for chunk in stream:
        out.chunks.append(chunk)
        out.ids.add(chunk.id)
        assert out.usage is None, "nothing may follow the usage chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            out.usage = chunk.usage
            continue
        for index, text, finish_reason in pieces_of(chunk):
            assert out.finish.get(index) is None, f"choice {index} continued after it finished"
            if text is not None:
                out.pieces.setdefault(index, []).append(text)
            out.finish[index] = finish_reason
    return out


def collect_completion_stream(stream) -> Streamed:
    return _collect(stream, lambda chunk: [(c.index, c.text, c.finish_reason) for c in chunk.choices])


def collect_chat_stream(stream) -> Streamed:
    def pieces_of(chunk):
        (choice,) = chunk.choices
        return [(0, choice.delta.content, choice.finish_reason)]

    return _collect(stream, pieces_of)


def assert_clean_pieces(pieces: list[str], full: str) -> None:
    """No piece shows U+FFFD unless the whole text has one; the pieces joined are the text."""
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert not [p for p in pieces if REPLACEMENT in p], pieces


def assert_error_shape(
    error: openai.APIStatusError, status: int, kind: str, param: str | None = None, code: str | None = None
) -> dict:
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == kind
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    assert error.type == kind  # the SDK read the same body
    return body["error"]


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until_idle(server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "openelm_requests_running") == 0 and metric(server, "openelm_requests_waiting") == 0:
            return True
        time.sleep(0.05)
    return False

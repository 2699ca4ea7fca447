"""A streamed answer whose client leaves early ends its requests, however early.

The first chunk of each streamed route (the tutorial's prompt, an echo, the chat role) goes out
before the body reads anything from the engine. A client that leaves while that chunk is being
sent cancels the body there, before its own cleanup has anything to cancel; the response must
end the requests itself, or they run to their last token for nobody (in a real server the send
waits on the socket; here it waits half a second, and the client leaves meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from http_checks import chat, completion, tutorial
from in_process import InProcessServer

LONG = 1900  # tokens: several seconds of generation, far longer than the cancellation may take


@pytest.fixture(scope="module")
def app(serving_dirs):
    server = InProcessServer(*serving_dirs, max_model_len=2048)
    yield server
    server.close()


async def call_and_leave(app, path: str, body: dict) -> list[dict]:
    """One ASGI call whose client leaves while the first chunk of the body is being sent, as a
    real server's send waits on a socket: the body has yielded its first chunk, and nothing of
    it has read from the engine yet."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    first_chunk_sending = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await first_chunk_sending.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body"):
            first_chunk_sending.set()
            await asyncio.sleep(0.5)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"in-process"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 6006),
    }
    await app(scope, receive, send)
    return sent


def running_and_waiting(app) -> tuple[int, int]:
    stats = app.engine.stats()
    return stats.running, stats.waiting


def wait_idle(app, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if running_and_waiting(app) == (0, 0):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "path,body",
    [
        ("/", tutorial("Once upon a time", LONG, stream=True)),
        ("/v1/completions", completion(["Once upon a time", "In a galaxy"], LONG, stream=True, echo=True)),
        ("/v1/chat/completions", chat("Tell me a long story", LONG, stream=True)),
    ],
    ids=["tutorial", "completions", "chat"],
)
def test_a_stream_left_before_its_body_starts_is_cancelled(app, path, body):
    assert wait_idle(app, 30), running_and_waiting(app)
    sent = asyncio.run(call_and_leave(app.app, path, body))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert wait_idle(app, 1), f"still generating for a client that left: {running_and_waiting(app)}"

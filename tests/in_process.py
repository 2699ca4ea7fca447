"""The server in the test process, where a process adds nothing to the test: create_app on a
real engine with a tiny model, either called through httpx's ASGI transport (InProcessServer: no
port) or served by uvicorn in a thread on 127.0.0.1 (ServerThread: real HTTP for any client)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from openai import AsyncOpenAI

from api import log_handler, uvicorn_config
from openelm_server.config import Settings, load_settings
from openelm_server.listen import bind_socket
from openelm_server.serving.app import create_app
from openelm_server.startup import build_engine

SERVER_LOGGER = logging.getLogger("openelm_server")


class InProcessServer:
    def __init__(self, model_dir: Path, tokenizer_dir: Path, **settings):
        settings = Settings(
            model_path=str(model_dir),
            tokenizer_path=str(tokenizer_dir),
            device="cpu",
            **{"max_batch_size": 8, "max_model_len": 512, **settings},
        )
        self.engine, self.tokenizer = build_engine(settings)
        self.app = create_app(settings, self.engine, self.tokenizer)
        self.model = settings.model_name
        self.engine.start()  # the ASGI transport runs no lifespan

    def close(self) -> None:
        self.engine.shutdown()

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://in-process", timeout=120)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def call():
            async with self._client() as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.request("POST", path, json=body)

    def post_ok(self, path: str, body: dict) -> dict:
        """The JSON of a 200 answer."""
        response = self.post(path, body)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, path: str, body: dict) -> list[dict]:
        """The JSON payloads of a streamed answer, checked to end with [DONE]."""
        response = self.post(path, {**body, "stream": True})
        assert response.status_code == 200, response.text
        events = response.text.strip().split("\n\n")
        assert events[-1] == "data: [DONE]", events[-3:]
        return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]

    def metric(self, name: str) -> float:
        """The value of an unlabelled series in /metrics."""
        for line in self.request("GET", "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not in /metrics")

    def sdk(self, call):
        """Run ``call(client)`` with the official openai SDK on this app; returns its result."""

        async def run():
            async with self._client() as http:
                client = AsyncOpenAI(base_url="http://in-process/v1", api_key="x", http_client=http, max_retries=0)
                return await call(client)

        return asyncio.run(run())


class ServerThread:
    """api.py's server, run by uvicorn in a thread of the test process on 127.0.0.1: real sockets,
    so chunked bodies, clients that hang up, curl, the SDK and the browser behave as against
    ``python api.py``, without a process to start and a model to load per test. Settings are
    read from flags and an environment as api.py reads them.

    What api.py does around the app (signal handling, the start-up log, the 0.0.0.0 warning) is
    not here: tests/e2e starts the real process for those."""

    # The servers' loggers log at their level while any of these servers runs.
    _running: list[ServerThread] = []
    _level_before = logging.NOTSET

    def __init__(self, model_dir: Path, tokenizer_dir: Path, *flags: str, env: dict | None = None):
        paths = ["--model-path", str(model_dir), "--tokenizer-path", str(tokenizer_dir), "--host", "127.0.0.1"]
        self.settings = load_settings([*paths, *flags], env or {})
        self.engine, self.tokenizer = build_engine(self.settings)
        self.app = create_app(self.settings, self.engine, self.tokenizer)
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The process's log lines from now on, in api.py's format (other servers of the test
        # process write here too: tests look for their own request ids and markers).
        self._log = io.StringIO()
        self._handler = log_handler(self._log)
        logging.getLogger().addHandler(self._handler)
        if not ServerThread._running:
            ServerThread._level_before = SERVER_LOGGER.level
        ServerThread._running.append(self)
        SERVER_LOGGER.setLevel(self.settings.log_level.upper())
        self._server = uvicorn.Server(uvicorn_config(self.app, self.settings))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server thread did not start:\n{self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        self._handler.acquire()
        try:
            return self._log.getvalue()
        finally:
            self._handler.release()

    def serving(self) -> bool:
        return self._thread.is_alive() and not self._server.should_exit

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        logging.getLogger().removeHandler(self._handler)
        if self in ServerThread._running:
            ServerThread._running.remove(self)
            if not ServerThread._running:
                SERVER_LOGGER.setLevel(ServerThread._level_before)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

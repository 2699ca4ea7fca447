"""The app in-process: create_app on a real engine with a tiny model, called through httpx's
ASGI transport (no port, no subprocess) where a process adds nothing to the test."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from openelm_server.config import Settings
from openelm_server.serving.app import create_app
from openelm_server.startup import build_engine


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

    def sdk(self, call):
        """Run ``call(client)`` with the official openai SDK on this app; returns its result."""

        async def run():
            async with self._client() as http:
                client = AsyncOpenAI(base_url="http://in-process/v1", api_key="x", http_client=http, max_retries=0)
                return await call(client)

        return asyncio.run(run())

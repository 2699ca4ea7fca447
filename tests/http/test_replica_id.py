"""X-Replica-Id from plain api.py's app, in-process over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import os
import re
import socket

import httpx
import pytest

from openelm_server.config import Settings
from openelm_server.serving.app import create_app
from openelm_server.startup import build_engine

API_KEY = "replica-test-key"


@pytest.fixture(scope="module")
def engine_and_tokenizer(serving_dirs):
    model_dir, tokenizer_dir = serving_dirs
    settings = Settings(
        model_path=str(model_dir), tokenizer_path=str(tokenizer_dir), max_batch_size=2, max_model_len=256
    )
    engine, tokenizer = build_engine(settings)
    # httpx's ASGI transport does not run the app's lifespan, which would start the engine.
    engine.start()
    yield settings, engine, tokenizer
    engine.shutdown()


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica.test")


def test_every_answer_names_the_same_replica(engine_and_tokenizer):
    asyncio.run(_every_answer_names_the_same_replica(engine_and_tokenizer))


async def _every_answer_names_the_same_replica(engine_and_tokenizer):
    settings, engine, tokenizer = engine_and_tokenizer
    app = create_app(settings, engine, tokenizer)
    replica_id = app.state.replica_id
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}-{os.getpid()}-[0-9a-f]{{8}}", replica_id)
    async with client_for(app) as client:
        answers = [
            await client.get("/health"),
            await client.get("/metrics"),
            await client.post("/", json={"prompt": "Once upon a time", "max_new_tokens": 4}),
            await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}),
            await client.post("/", json={"prompt": ""}),  # 400 from validation
            await client.get("/no-such-route"),  # 404
        ]
        async with client.stream("POST", "/", json={"prompt": "Once", "max_new_tokens": 4, "stream": True}) as stream:
            body = "".join([piece async for piece in stream.aiter_text()])
            answers.append(stream)
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 400, 404, 200]
    assert body.startswith("Once")
    assert {a.headers.get("x-replica-id") for a in answers} == {replica_id}
    assert all(len(a.headers.get_list("x-replica-id")) == 1 for a in answers)


def test_guard_answers_name_the_replica_too(engine_and_tokenizer):
    asyncio.run(_guard_answers_name_the_replica_too(engine_and_tokenizer))


async def _guard_answers_name_the_replica_too(engine_and_tokenizer):
    settings, engine, tokenizer = engine_and_tokenizer
    app = create_app(Settings(**{**settings.__dict__, "api_key": API_KEY}), engine, tokenizer, replica_id="given-id")
    async with client_for(app) as client:
        unauthorized = await client.get("/metrics")
        authorized = await client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-replica-id"] == "given-id"
    assert authorized.status_code == 200 and authorized.headers["x-replica-id"] == "given-id"


def test_each_server_gets_its_own_id(engine_and_tokenizer):
    settings, engine, tokenizer = engine_and_tokenizer
    assert (
        create_app(settings, engine, tokenizer).state.replica_id
        != create_app(settings, engine, tokenizer).state.replica_id
    )

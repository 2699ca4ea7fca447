"""Running the engine in-process for the engine tests: build one, run requests, check its blocks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from openelm_server.engine.async_engine import Engine
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.sampling import SamplingParams
from openelm_server.model.loader import load_openelm
from openelm_server.tokenizer import load_tokenizer


def make_engine(model_dir: Path, tokenizer_dir: Path, **config) -> Engine:
    engine = Engine(
        load_openelm(model_dir, show_progress=False),
        load_tokenizer(tokenizer_dir),
        EngineConfig(**{"max_model_len": 256, **config}),
    )
    engine.start()
    return engine


def reference(model_dir: Path) -> dict:
    return json.loads((model_dir / "reference.json").read_text())


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


async def collect(engine: Engine, prompt_ids: list[int], params: SamplingParams, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    tokens: list[int] = []
    async for event in engine.generate(prompt_ids, params):
        assert event.error is None, event.error
        tokens += event.token_ids
    return tokens


def run_together(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def main():
        return await asyncio.gather(*(collect(engine, prompt, params) for prompt, params in jobs))

    return asyncio.run(main())


def run_one_by_one(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    return [asyncio.run(collect(engine, prompt, params)) for prompt, params in jobs]


def assert_no_blocks_held(engine: Engine) -> None:
    """Every block is free once nothing runs; the scheduler's queues are empty."""
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0), stats
    manager = engine.core.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    assert not any(manager.ref_counts)

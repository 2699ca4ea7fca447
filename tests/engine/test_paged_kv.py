"""The paged KV cache: blocks handed out and given back, never leaked, whatever ends a request."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import assert_no_blocks_held, collect, greedy, make_engine

from openelm_server.engine.block_manager import BlockManager
from openelm_server.model.kv_cache import SCRATCH_BLOCK


def test_blocks_are_handed_out_and_given_back():
    manager = BlockManager(num_blocks=5, block_size=4, prefix_caching=False)
    assert manager.num_usable_blocks == 4 and manager.num_free_blocks == 4
    assert manager.blocks_needed([], 9) == 3 and manager.blocks_needed([1, 2], 8) == 0
    first = manager.allocate(3)
    assert SCRATCH_BLOCK not in first and manager.num_free_blocks == 1
    with pytest.raises(RuntimeError, match="2 KV-cache blocks asked for, 1 free"):
        manager.allocate(2)
    manager.release(first)
    assert manager.num_used_blocks == 0 and not any(manager.ref_counts)


@pytest.fixture(scope="module")
def engine(own_model_dir, own_tokenizer_dir):
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4, max_num_batched_tokens=32)
    yield engine
    engine.shutdown()


def test_a_request_holds_the_blocks_of_its_tokens_and_gives_them_back(engine):
    async def main():
        stream = engine.generate(list(range(1, 41)), greedy(30))
        await stream.__anext__()
        held = engine.stats().kv_blocks_used  # 41 tokens in cache or about to be: 3 blocks
        async for _ in stream:
            pass
        return held

    assert asyncio.run(main()) == 3
    assert_no_blocks_held(engine)


def test_cancelled_requests_give_their_blocks_back(engine):
    async def main():
        streams = [engine.generate([1] + list(range(50, 50 + 20 * i)), greedy(150)) for i in range(1, 6)]
        await streams[0].__anext__()
        for stream in streams:
            stream.cancel()
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0 and engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert_no_blocks_held(engine)


def test_a_failed_step_gives_its_blocks_back(engine):
    forward = engine.model.forward
    failures = {"left": 1}

    def forward_failing_once(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("a kernel failed (simulated)")
        return forward(*args, **kwargs)

    engine.model.forward = forward_failing_once
    try:

        async def main():
            events = [event async for event in engine.generate(list(range(1, 60)), greedy(5))]
            return events[-1]

        last = asyncio.run(main())
    finally:
        del engine.model.forward
    assert last.error is not None and not last.error.retryable
    assert_no_blocks_held(engine)
    assert len(asyncio.run(collect(engine, list(range(1, 60)), greedy(5)))) == 5


def test_the_pool_is_sized_in_tokens_and_counts_requests_running_at_once(own_model_dir, own_tokenizer_dir):
    """--kv-cache-tokens 4096 holds 32 requests of 50 + 40 tokens at once (6 blocks each)."""
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=32, kv_cache_tokens=4096)
    seen_running = []
    try:
        assert engine.stats().kv_blocks_total == 4096 // 16

        async def main():
            tasks = [asyncio.ensure_future(collect(engine, [1] + [3 + i] * 49, greedy(40))) for i in range(32)]
            while not all(task.done() for task in tasks):
                seen_running.append(engine.stats().running)
                await asyncio.sleep(0.005)
            return [task.result() for task in tasks]

        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert all(len(tokens) == 40 for tokens in results)
    assert max(seen_running) >= 24
    assert engine.stats().preemptions == 0


def test_scratch_block_takes_the_padding_and_nothing_else(own_model_dir, own_tokenizer_dir):
    """A sequence never gets block 0, which padding rows of a static decode step write into."""
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4, kv_cache_tokens=256)
    try:
        manager = engine.core.block_manager
        assert SCRATCH_BLOCK not in manager.allocate(manager.num_free_blocks)
        assert torch.count_nonzero(engine.core.kv_cache.keys[0][SCRATCH_BLOCK]) == 0
    finally:
        engine.shutdown()


def test_cache_flags_and_their_env_twins():
    from openelm_server.config import load_settings

    assert load_settings([], {}).kv_cache_tokens is None
    assert load_settings(["--kv-cache-tokens", "4096"], {}).kv_cache_tokens == 4096
    assert load_settings([], {"KV_CACHE_TOKENS": "8192"}).kv_cache_tokens == 8192
    assert load_settings([], {}).prefix_caching is True
    assert load_settings(["--no-prefix-caching"], {}).prefix_caching is False
    assert load_settings([], {"PREFIX_CACHING": "0"}).prefix_caching is False

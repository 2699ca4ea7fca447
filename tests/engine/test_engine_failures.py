"""Failures inside a step, on the engine alone: out of memory fails only that step's requests
(retryable), and one request's bad sampling values fail only that request."""

from __future__ import annotations

import asyncio

import pytest
import torch


def make_engine(serving_dirs, **config):
    from openelm_server.engine.async_engine import Engine
    from openelm_server.engine.config import EngineConfig
    from openelm_server.model.loader import load_openelm
    from openelm_server.tokenizer import load_tokenizer

    model_dir, tokenizer_dir = serving_dirs
    return Engine(
        load_openelm(model_dir, show_progress=False),
        load_tokenizer(tokenizer_dir),
        EngineConfig(**{"max_model_len": 128, "max_batch_size": 2, **config}),
    )


async def drain(stream) -> tuple[list[int], str | None, object]:
    tokens, finish, error = [], None, None
    async for event in stream:
        tokens += event.token_ids
        finish = event.finish_reason
        error = event.error
    return tokens, finish, error


@pytest.mark.parametrize("failing_call", [1, 2], ids=["prefill", "decode"])
def test_out_of_memory_fails_only_that_step_and_is_retryable(serving_dirs, failing_call):
    from openelm_server.engine.sampling import SamplingParams

    engine = make_engine(serving_dirs)
    forward = engine.model.forward
    calls = {"n": 0}

    def forward_with_one_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(*args, **kwargs)

    engine.model.forward = forward_with_one_oom
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def main():
        # Queued before the engine starts: the first two share the first step, the third waits.
        first = [engine.generate([1, 50, 60, 70], params) for _ in range(2)]
        third = engine.generate([1, 50], params)
        engine.start()
        failed = await asyncio.gather(*(drain(s) for s in first))
        waited = await drain(third)
        later = await asyncio.gather(*(drain(engine.generate([1, 80, 90], params)) for _ in range(2)))
        return failed, waited, later

    try:
        failed, waited, later = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    for tokens, finish, error in failed:
        assert error is not None and error.retryable, (tokens, finish, error)
        assert finish is None
        assert len(tokens) == failing_call - 1  # the prefill's token, if that step went through
    for tokens, finish, error in [waited, *later]:
        assert error is None and finish == "length" and len(tokens) == 6
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_bad_sampling_values_fail_only_their_own_request(serving_dirs):
    """A request's own sampling parameters (here a temperature so small it overflows the logits)
    must not take down the requests it happens to share a step with."""
    from openelm_server.engine.sampling import SamplingParams

    engine = make_engine(serving_dirs, max_batch_size=4)

    async def main():
        good = engine.generate([1, 50, 60, 70], SamplingParams(max_new_tokens=4, ignore_eos=True))
        bad = engine.generate([1, 50], SamplingParams(max_new_tokens=4, temperature=1e-300, seed=1))
        engine.start()
        return await asyncio.gather(drain(good), drain(bad))

    try:
        (good_tokens, good_finish, good_error), _ = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    assert good_error is None, f"an innocent request failed with its batch-mate: {good_error}"
    assert good_finish == "length" and len(good_tokens) == 4

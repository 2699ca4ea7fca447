"""Steps that read prompts, cut at attention into per-token pieces over padded token counts (the
pieces CUDA replays as graphs), run eagerly here: cutting and padding must change nothing."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import assert_no_blocks_held, greedy, make_engine, reference, run_one_by_one, run_together

from openelm_server.engine.piecewise_graphs import PiecewiseStep, token_buckets
from openelm_server.engine.request import Request
from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.scheduler import ScheduledRequest
from openelm_server.model.kv_cache import SCRATCH_BLOCK
from openelm_server.model.loader import load_openelm


def test_token_buckets_double_then_grow_by_256_then_by_about_a_quarter_and_end_at_the_budget():
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    large = token_buckets(16384)
    assert large[11:15] == [2048, 2560, 3072, 3840] and large[-1] == 16384 and len(large) < 24
    assert all(later - earlier <= max(256, earlier // 4) for earlier, later in zip(large[4:], large[5:]))
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(256) == [16, 32, 64, 128, 256]
    assert token_buckets(16) == [16]


def install_recording_piecewise(engine, max_tokens: int) -> list[tuple[int, int]]:
    """Gives the engine's runner a piecewise step; returns the (tokens, groups) of each step it runs."""
    piecewise = PiecewiseStep(engine.model, engine.core.kv_cache, max_tokens)
    steps: list[tuple[int, int]] = []
    real_run = piecewise.run

    def recording_run(tokens, positions, slots, groups):
        steps.append((len(tokens), len(groups)))
        return real_run(tokens, positions, slots, groups)

    piecewise.run = recording_run
    engine.core.runner.piecewise = piecewise
    return steps


@pytest.mark.parametrize("budget", [16, 40])
def test_reference_answers_through_the_pieces_alone_and_batched(shared_model_dir, shared_tokenizer_dir, budget):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    expected = [case["greedy_ids"] for case in ref["cases"]]
    engine = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8, max_num_batched_tokens=budget)
    try:
        steps = install_recording_piecewise(engine, budget)
        assert run_one_by_one(engine, jobs) == expected
        assert run_together(engine, jobs * 2) == expected * 2
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()
    assert any(tokens not in token_buckets(budget) for tokens, _ in steps)  # padded steps
    assert any(groups >= 3 for _, groups in steps)  # decodes and two prompts' chunks in one step


def test_prompt_logprobs_and_prefix_hits_through_the_pieces_match_the_plain_forward(own_model_dir, own_tokenizer_dir):
    """Numbers, not only tokens: every prompt position's logprob and each new token's through
    the pieces are the plain forward's; the second request reads its prompt after a prefix
    found in the cache (prompt logprobs bypass the cache: the first reads all of its prompt)."""
    prefix = [1] + [(5 * i) % 250 + 3 for i in range(70)]
    jobs = [
        (prefix + [7, 8, 9], greedy(5, logprobs=2, prompt_logprobs=1)),
        (prefix + [10, 11], greedy(5, logprobs=2)),
    ]

    def answers(with_pieces: bool):
        engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4, max_num_batched_tokens=48)
        steps = install_recording_piecewise(engine, 48) if with_pieces else []

        async def collect_events(prompt_ids, params):
            return [event async for event in engine.generate(prompt_ids, params)]

        try:
            results = []
            for prompt_ids, params in jobs:
                events = asyncio.run(collect_events(prompt_ids, params))
                scores = [lp.logprob for lp in (events[0].prompt_logprobs or (None,))[1:]]
                scores += [lp.logprob for e in events for lp in e.logprobs]
                results.append(([t for e in events for t in e.token_ids], scores))
            return results, steps, engine.stats().prefix_cache_hits
        finally:
            engine.shutdown()

    plain, _, plain_hits = answers(with_pieces=False)
    pieces, steps, hits = answers(with_pieces=True)
    assert steps and hits == plain_hits >= 64
    for (plain_tokens, plain_scores), (tokens, scores) in zip(plain, pieces):
        assert tokens == plain_tokens
        assert scores == pytest.approx(plain_scores, abs=1e-4)


def test_a_mixed_step_through_the_pieces_equals_the_plain_forward_and_padding_writes_only_scratch(own_model_dir):
    """One step of two decodes and two prompt chunks (27 tokens, padded to 32): the wanted logits
    and every key written are the plain forward's, and the only block written besides the
    requests' own is the scratch block."""
    model = load_openelm(own_model_dir, show_progress=False)
    cache = model.new_paged_kv_cache(40)
    for pool in cache.keys + cache.values:
        pool.normal_(generator=torch.Generator().manual_seed(0))  # earlier tokens' keys, made up

    def request(length: int, blocks: list[int]) -> Request:
        r = Request("r", [1 + (7 * i) % 250 for i in range(length)], SamplingParams(max_new_tokens=4))
        r.block_ids = blocks
        return r

    step = [
        ScheduledRequest(request(40, [1, 2, 3]), 39, 1),
        ScheduledRequest(request(70, [4, 5, 6, 7, 8]), 69, 1),
        ScheduledRequest(request(60, [10, 11, 12, 13]), 16, 16),
        ScheduledRequest(request(9, [20]), 0, 9),
    ]
    wanted = [[0], [0], [15], list(range(9))]
    before = [pool.clone() for pool in cache.keys + cache.values]
    plain = ModelRunner(model, cache, None).run(step, wanted)
    plain_cache = [pool.clone() for pool in cache.keys + cache.values]
    for pool, saved in zip(cache.keys + cache.values, before):
        pool.copy_(saved)
    piecewise = PiecewiseStep(model, cache, 64)
    pieces = ModelRunner(model, cache, None, piecewise).run(step, wanted)

    for ours, theirs in zip(pieces, plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    written = {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 20}
    for pool, saved, expected in zip(cache.keys + cache.values, before, plain_cache):
        changed = {int(b) for b in (pool != saved).flatten(1).any(dim=1).nonzero()}
        assert changed <= written | {SCRATCH_BLOCK}
        assert SCRATCH_BLOCK in changed  # the 5 padding tokens
        torch.testing.assert_close(pool[1:], expected[1:], rtol=1e-5, atol=1e-5)

"""Automatic prefix caching: a prompt reuses the full blocks of the longest prefix computed
before, reads only the rest, and answers exactly as without the cache."""

from __future__ import annotations

import pytest
from engine_helpers import assert_no_blocks_held, greedy, make_engine, reference, run_one_by_one, run_together

from openelm_server.engine.block_manager import BlockManager


def filled(manager: BlockManager, tokens: list[int]) -> list[int]:
    """Blocks holding ``tokens`` as a request that computed them all would leave them."""
    blocks = manager.allocate(manager.blocks_needed([], len(tokens)))
    manager.cache_full_blocks(tokens, blocks, len(tokens))
    return blocks


def test_the_longest_cached_prefix_of_full_blocks_is_found():
    manager = BlockManager(num_blocks=16, block_size=4, prefix_caching=True)
    blocks = filled(manager, list(range(10)))  # two full blocks and a partial one
    assert manager.cached_prefix(list(range(10))) == blocks[:2]
    assert manager.cached_prefix(list(range(8))) == blocks[:1]  # the last token is always computed
    assert manager.cached_prefix(list(range(9))) == blocks[:2]
    assert manager.cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9]) == blocks[:1]
    # The same four tokens after another block are another block: the hash covers the whole prefix.
    assert manager.cached_prefix([9, 9, 9, 9, 4, 5, 6, 7, 0]) == []


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=5, block_size=2, prefix_caching=True)
    old = filled(manager, [1, 2, 3, 4])
    manager.release(old)
    new = filled(manager, [5, 6, 7, 8])
    manager.release(new)
    assert manager.num_used_blocks == 0
    assert manager.cached_prefix([1, 2, 3, 4, 0]) == old and manager.cached_prefix([5, 6, 7, 8, 0]) == new
    manager.take(manager.cached_prefix([1, 2, 3, 4, 0]))  # a hit makes the old prefix recently used
    manager.release(old)
    manager.allocate(2)  # evicts the least recently used: the tail of the new prefix, then its head
    assert manager.cached_prefix([5, 6, 7, 8, 0]) == [] and manager.cached_prefix([1, 2, 3, 4, 0]) == old


def test_without_prefix_caching_nothing_is_found():
    manager = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    filled(manager, list(range(12)))
    assert manager.cached_prefix(list(range(12))) == []


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_reference_answers_with_prefix_caching_on_and_off(shared_model_dir, shared_tokenizer_dir, prefix_caching):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    expected = [case["greedy_ids"] for case in ref["cases"]]
    engine = make_engine(
        shared_model_dir,
        shared_tokenizer_dir,
        max_batch_size=8,
        max_num_batched_tokens=16,
        prefix_caching=prefix_caching,
    )
    try:
        assert run_one_by_one(engine, jobs) == expected
        assert run_one_by_one(engine, jobs) == expected  # now from the cache where it is on
        assert run_together(engine, jobs * 2) == expected * 2
        stats = engine.stats()
        assert (stats.prefix_cache_hits > 0) == prefix_caching
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_a_shared_prefix_is_read_once(own_model_dir, own_tokenizer_dir):
    prefix = [1] + [(5 * i) % 200 + 3 for i in range(99)]  # 100 tokens: 6 full blocks
    jobs = [(prefix + [7, 8, 9], greedy(10)), (prefix + [11, 12], greedy(10))]
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4)
    try:
        with_cache = run_one_by_one(engine, jobs)
        stats = engine.stats()
        assert stats.prefix_cache_queries == 103 + 102
        assert stats.prefix_cache_hits == 96
    finally:
        engine.shutdown()
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4, prefix_caching=False)
    try:
        assert run_one_by_one(engine, jobs) == with_cache
        assert engine.stats().prefix_cache_hits == 0
    finally:
        engine.shutdown()


def test_prompt_logprobs_are_computed_not_taken_from_the_cache(own_model_dir, own_tokenizer_dir):
    from openelm_server.engine.sampling import SamplingParams

    prompt = [1] + list(range(20, 60))
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=2)
    try:
        run_one_by_one(engine, [(prompt, greedy(2))])

        async def scored():
            return [e async for e in engine.generate(prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=0))]

        import asyncio

        (event,) = asyncio.run(scored())
        assert len(event.prompt_logprobs) == len(prompt) and event.prompt_logprobs[0] is None
        assert all(entry is not None for entry in event.prompt_logprobs[1:])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_prefix_cache_counters_over_http(own_model_dir, own_tokenizer_dir, prefix_caching):
    from in_process import InProcessServer

    server = InProcessServer(own_model_dir, own_tokenizer_dir, prefix_caching=prefix_caching)
    try:
        prompt = "Once upon a time " * 20
        body = {"model": server.model, "max_tokens": 3, "temperature": 0}
        first = server.post_ok("/v1/completions", {**body, "prompt": prompt + "there was"})
        second = server.post_ok("/v1/completions", {**body, "prompt": prompt + "a fox"})
        queried = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        assert server.metric("openelm_prefix_cache_queries_total") == (queried if prefix_caching else 0)
        hits = server.metric("openelm_prefix_cache_hits_total")
        if prefix_caching:
            assert hits >= 16 * (first["usage"]["prompt_tokens"] // 16 - 2)  # all but the prompt's last blocks
        else:
            assert hits == 0
        stats = server.request("GET", "/stats").json()
        assert stats["prefix_cache_hit_tokens"] == hits
    finally:
        server.close()

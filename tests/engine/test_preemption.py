"""A KV cache too small for everyone: the newest request is preempted and recomputed later, and
every answer is still the one it gets alone. Nothing fails for lack of cache."""

from __future__ import annotations

import pytest
from engine_helpers import assert_no_blocks_held, greedy, make_engine, reference, run_one_by_one, run_together

from openelm_server.engine.sampling import SamplingParams


@pytest.mark.parametrize("speculative", ["none", "ngram"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_reference_answers_after_preemption_and_recompute(
    shared_model_dir, shared_tokenizer_dir, prefix_caching, speculative
):
    ref = reference(shared_model_dir)
    # 128 tokens: the longest case (50 + 24) fits alone, but not beside the others.
    engine = make_engine(
        shared_model_dir,
        shared_tokenizer_dir,
        max_batch_size=8,
        max_model_len=128,
        kv_cache_tokens=128,
        max_num_batched_tokens=32,
        prefix_caching=prefix_caching,
        speculative=speculative,
    )
    try:
        jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]] * 3
        assert run_together(engine, jobs) == [case["greedy_ids"] for case in ref["cases"]] * 3
        stats = engine.stats()
        assert stats.preemptions > 0
        # With speculation, verified proposals run through preemption and recompute too.
        assert (stats.spec_accepted_tokens > 0) == (speculative == "ngram")
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_seeded_sampling_is_the_same_after_preemption(own_model_dir, own_tokenizer_dir):
    jobs = [
        (
            [1] + [10 + i + j for j in range(40)],
            SamplingParams(max_new_tokens=60, temperature=1.0, seed=i, ignore_eos=True),
        )
        for i in range(6)
    ]
    roomy = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=6)
    try:
        alone = run_one_by_one(roomy, jobs)
    finally:
        roomy.shutdown()
    tight = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=6, max_model_len=128, kv_cache_tokens=160)
    try:
        assert run_together(tight, jobs) == alone
        assert tight.stats().preemptions > 0
        assert_no_blocks_held(tight)
    finally:
        tight.shutdown()


def test_a_pool_smaller_than_one_request_is_refused(own_model_dir, own_tokenizer_dir):
    with pytest.raises(ValueError, match="kv_cache_tokens 100 is less than max_model_len 256"):
        make_engine(own_model_dir, own_tokenizer_dir, kv_cache_tokens=100)

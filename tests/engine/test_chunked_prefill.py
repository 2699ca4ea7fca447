"""Chunked prefill: prompts read a budget's worth of tokens per step, in the same forward as the
running decodes; the answers are those of the shared reference whatever the budget."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import assert_no_blocks_held, collect, greedy, make_engine, reference, run_one_by_one, run_together


@pytest.mark.parametrize("budget", [16, 24, 64, 512])
def test_reference_answers_alone_and_batched_for_every_budget(shared_model_dir, shared_tokenizer_dir, budget):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    engine = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8, max_num_batched_tokens=budget)
    try:
        expected = [case["greedy_ids"] for case in ref["cases"]]
        assert run_one_by_one(engine, jobs) == expected
        assert run_together(engine, jobs * 2) == expected * 2
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(own_model_dir, own_tokenizer_dir):
    engine = make_engine(
        own_model_dir, own_tokenizer_dir, max_batch_size=4, max_num_batched_tokens=32, max_model_len=512
    )
    runner = engine.core.runner
    run = runner.run
    steps: list[list[int]] = []  # tokens per scheduled request, per step

    def recording_run(scheduled, wanted):
        steps.append([s.num_tokens for s in scheduled])
        return run(scheduled, wanted)

    runner.run = recording_run
    long_prompt = [1] + [(7 * i) % 250 + 3 for i in range(300)]
    try:

        async def main():
            decoding = asyncio.ensure_future(collect(engine, [1, 5, 6], greedy(40)))
            while not steps:
                await asyncio.sleep(0.001)
            return await asyncio.gather(decoding, collect(engine, long_prompt, greedy(3)))

        short_tokens, long_tokens = asyncio.run(main())
        runner.run = run
        alone = run_one_by_one(engine, [([1, 5, 6], greedy(40)), (long_prompt, greedy(3))])
    finally:
        del runner.run
        engine.shutdown()
    assert [short_tokens, long_tokens] == alone
    chunk_steps = [step for step in steps if any(n > 3 for n in step)]  # steps reading the long prompt
    assert len(chunk_steps) >= 300 // 32  # the long prompt took several steps ...
    assert all(sum(step) <= 32 for step in steps)  # ... each within the budget ...
    assert all(1 in step for step in chunk_steps)  # ... and the short request decoded in every one of them


def test_the_budget_flag_and_its_default(own_model_dir, own_tokenizer_dir):
    from openelm_server.config import load_settings

    assert load_settings([], {}).max_num_batched_tokens is None
    assert load_settings(["--max-num-batched-tokens", "64"], {}).max_num_batched_tokens == 64
    assert load_settings([], {"MAX_NUM_BATCHED_TOKENS": "128"}).max_num_batched_tokens == 128
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=2)
    try:
        assert engine.core.scheduler.max_num_batched_tokens == 256  # the CPU's default
    finally:
        engine.shutdown()

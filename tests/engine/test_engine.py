"""The engine in-process: continuous batching must not change any request's output."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

from openelm_server.engine.async_engine import Engine, QueueFullError
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.sampling import SamplingParams
from openelm_server.model.loader import load_openelm
from openelm_server.tokenizer import load_tokenizer


def make_engine(model_dir, tokenizer_dir, **config) -> Engine:
    engine = Engine(
        load_openelm(model_dir, show_progress=False),
        load_tokenizer(tokenizer_dir),
        EngineConfig(**{"max_model_len": 256, **config}),
    )
    engine.start()
    return engine


@pytest.fixture(scope="module")
def shared_engine(shared_model_dir, shared_tokenizer_dir):
    engine = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=6)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def own_engine(own_model_dir, own_tokenizer_dir):
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=4, max_queue=64)
    yield engine
    engine.shutdown()


async def run(engine: Engine, prompt_ids, params: SamplingParams, delay: float = 0.0):
    await asyncio.sleep(delay)
    tokens, text, finish = [], "", None
    async for event in engine.generate(prompt_ids, params):
        assert event.error is None
        tokens += event.token_ids
        text += event.text
        finish = event.finish_reason
    return tokens, text, finish


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def test_reference_tokens_among_15_others_arriving_at_different_times(shared_engine, shared_model_dir):
    reference = json.loads((shared_model_dir / "reference.json").read_text())
    cases = reference["cases"] * 4
    rng = random.Random(0)

    async def main():
        return await asyncio.gather(
            *(
                run(shared_engine, c["prompt_ids"], greedy(reference["new_tokens"]), delay=rng.uniform(0, 0.3))
                for c in cases
            )
        )

    results = asyncio.run(main())
    for case, (tokens, _, finish) in zip(cases, results):
        assert tokens == case["greedy_ids"]
        assert finish == "length"


def test_self_made_model_alone_equals_in_a_crowd(own_engine):
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 300) for _ in range(rng.randrange(1, 60))] for _ in range(16)]
    lengths = [rng.randrange(1, 30) for _ in prompts]

    async def alone():
        return [await run(own_engine, p, greedy(n)) for p, n in zip(prompts, lengths)]

    async def crowd():
        return await asyncio.gather(
            *(run(own_engine, p, greedy(n), delay=rng.uniform(0, 0.2)) for p, n in zip(prompts, lengths))
        )

    expected = asyncio.run(alone())
    assert asyncio.run(crowd()) == expected
    assert [len(tokens) for tokens, _, _ in expected] == lengths


def test_streamed_text_is_the_decoded_continuation(own_engine):
    tokenizer = own_engine.tokenizer
    prompt = tokenizer("你好 fox").input_ids
    tokens, text, _ = asyncio.run(run(own_engine, prompt, greedy(20)))
    full = tokenizer.decode(prompt + tokens, skip_special_tokens=True)
    assert tokenizer.decode(prompt, skip_special_tokens=True) + text == full


def test_admission_waits_for_a_free_slot(own_model_dir, own_tokenizer_dir):
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=2)
    try:
        seen_waiting = []

        async def main():
            tasks = [asyncio.ensure_future(run(engine, [1, 5, 6], greedy(40))) for _ in range(5)]
            while not all(t.done() for t in tasks):
                stats = engine.stats()
                assert stats.running <= 2
                seen_waiting.append(stats.waiting)
                await asyncio.sleep(0.005)
            return [t.result() for t in tasks]

        results = asyncio.run(main())
        assert max(seen_waiting) >= 1
        assert all(r == results[0] for r in results)
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_a_request_finishing_mid_batch_leaves_the_others_going(own_engine):
    prompt = [1, 40, 41, 42]

    async def main():
        short = asyncio.ensure_future(run(own_engine, prompt, greedy(3)))
        long = asyncio.ensure_future(run(own_engine, prompt, greedy(40)))
        return await short, await long

    (short_tokens, _, _), (long_tokens, _, finish) = asyncio.run(main())
    assert len(short_tokens) == 3 and len(long_tokens) == 40 and finish == "length"
    assert long_tokens[:3] == short_tokens


def test_cancelling_frees_the_slot_at_the_next_step(own_model_dir, own_tokenizer_dir):
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=1)
    try:

        async def main():
            stream = engine.generate([1, 5, 6], greedy(200))
            await stream.__anext__()
            assert engine.stats().kv_blocks_used == 1
            stream.cancel()
            for _ in range(200):
                if engine.stats().kv_blocks_used == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().kv_blocks_used == 0
            return await run(engine, [1, 7], greedy(3))

        tokens, _, _ = asyncio.run(main())
        assert len(tokens) == 3
    finally:
        engine.shutdown()


def test_full_queue_raises(own_model_dir, own_tokenizer_dir):
    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=1, max_queue=2)
    try:

        async def main():
            streams = [engine.generate([1, 5], greedy(200))]
            await asyncio.sleep(0.2)  # admitted: the only slot is taken
            try:
                streams += [engine.generate([1, 5], greedy(200)) for _ in range(2)]
                assert engine.stats().waiting == 2
                with pytest.raises(QueueFullError, match="--max-queue 2"):
                    engine.generate([1, 5], greedy(200))
            finally:
                for stream in streams:
                    stream.cancel()

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_too_long_requests_are_refused(own_engine):
    async def main():
        with pytest.raises(ValueError, match="exceeds the context"):
            own_engine.generate([1] * 200, greedy(100))
        with pytest.raises(ValueError, match="no tokens"):
            own_engine.generate([], greedy(1))

    asyncio.run(main())


def test_stop_string_spanning_tokens_is_cut_and_not_returned(own_engine):
    prompt = own_engine.tokenizer("Once upon a time").input_ids
    tokens, text, _ = asyncio.run(run(own_engine, prompt, greedy(30)))
    pieces = [own_engine.tokenizer.decode(prompt + tokens[:i], skip_special_tokens=True) for i in range(len(tokens))]
    assert len(text) > 12
    stop = text[5:11]  # six characters: likely more than one token
    stopped_tokens, stopped_text, finish = asyncio.run(run(own_engine, prompt, greedy(30, stop=(stop,))))
    assert finish == "stop"
    assert stopped_text == text[: text.index(stop)]
    assert stop not in stopped_text
    assert len(stopped_tokens) < len(tokens) and pieces


def test_eos_stops_generation(own_engine, monkeypatch):
    eos = own_engine.eos_token_id
    original = own_engine.model.logits

    def eos_after_two(hidden):
        logits = original(hidden)
        if eos_after_two.calls >= 2:
            logits[:, eos] = 1e9
        eos_after_two.calls += 1
        return logits

    eos_after_two.calls = 0
    monkeypatch.setattr(own_engine.model, "logits", eos_after_two)
    tokens, _, finish = asyncio.run(run(own_engine, [1, 9, 10], SamplingParams(max_new_tokens=50)))
    assert finish == "stop" and tokens[-1] == eos and len(tokens) == 3


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(own_engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=100, seed=1234, ignore_eos=True)
    prompt = [1, 20, 21, 22]
    alone = asyncio.run(run(own_engine, prompt, params))

    async def crowded():
        noise = [
            run(own_engine, [1, 50 + i], SamplingParams(max_new_tokens=25, temperature=1.0, ignore_eos=True))
            for i in range(5)
        ]
        results = await asyncio.gather(run(own_engine, prompt, params, delay=0.05), *noise)
        return results[0]

    assert asyncio.run(crowded()) == alone
    other_seed = asyncio.run(
        run(
            own_engine,
            prompt,
            SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=100, seed=99, ignore_eos=True),
        )
    )
    assert other_seed != alone


def test_penalties_change_greedy_output_and_stay_deterministic(own_engine):
    prompt = [1, 20, 20, 20, 21]
    plain = asyncio.run(run(own_engine, prompt, greedy(30)))
    penalized = asyncio.run(run(own_engine, prompt, greedy(30, repetition_penalty=1.5)))
    again = asyncio.run(run(own_engine, prompt, greedy(30, repetition_penalty=1.5)))
    assert penalized == again
    assert len(set(penalized[0])) >= len(set(plain[0]))


def test_the_engine_thread_does_not_block_the_caller(own_engine):
    """Submitting returns at once; the work happens on the engine's own thread."""
    threads = set()
    runner = own_engine.core.runner
    original = runner.run

    def recording_run(*args):
        threads.add(threading.current_thread().name)
        return original(*args)

    runner.run = recording_run
    try:

        async def main():
            start = time.monotonic()
            stream = own_engine.generate([1, 5], greedy(30))
            submitted = time.monotonic() - start
            async for _ in stream:
                pass
            return submitted

        assert asyncio.run(main()) < 0.05
        assert threads == {"engine"}
    finally:
        del runner.run


def test_static_decode_steps_equal_dynamic_ones(own_model_dir, own_tokenizer_dir):
    """The CUDA-graph path's logic (bucketed batch and block table, dummy rows in the scratch
    block), run eagerly: the tokens must be those of the plain path."""
    from openelm_server.engine.cuda_graphs import StaticDecoder

    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=6)
    try:
        rng = random.Random(5)
        prompts = [[1] + [rng.randrange(3, 300) for _ in range(rng.randrange(1, 150))] for _ in range(10)]

        async def crowd():
            return await asyncio.gather(*(run(engine, p, greedy(25), delay=rng.uniform(0, 0.2)) for p in prompts))

        expected = asyncio.run(crowd())
        core = engine.core
        static_decoder = StaticDecoder(engine.model, core.kv_cache, 6, 16, capture=False)
        assert static_decoder.bucket(3, 9) == (4, 16)
        core.runner.static_decoder = static_decoder
        assert asyncio.run(crowd()) == expected
    finally:
        engine.shutdown()


def test_short_prompt_chunks_and_prompt_logprobs_through_static_shapes_answer_alike(own_model_dir, own_tokenizer_dir):
    """A static step takes any row of up to its query length: with rows of up to 4 tokens, the
    short ends of chunked prompts go through it too, some wanting only their last logits and
    some every position's (prompt logprobs). Tokens and logprobs are those of the plain path."""
    from openelm_server.engine.cuda_graphs import StaticDecoder

    engine = make_engine(own_model_dir, own_tokenizer_dir, max_batch_size=6, max_num_batched_tokens=6)
    try:
        rng = random.Random(7)
        prompts = [[1] + [rng.randrange(3, 300) for _ in range(length)] for length in (2, 6, 9, 13, 17)]
        jobs = [(p, greedy(6)) for p in prompts] + [(prompts[3], greedy(4, logprobs=1, prompt_logprobs=1))]

        async def collect(prompt_ids, params):
            return [event async for event in engine.generate(prompt_ids, params)]

        async def together():
            return await asyncio.gather(*(collect(p, params) for p, params in jobs))

        def tokens_and_logprobs(results):
            tokens = [[t for e in events for t in e.token_ids] for events in results]
            prompt_scores = [lp.logprob for lp in results[-1][0].prompt_logprobs[1:]]
            return tokens, prompt_scores

        expected_tokens, expected_scores = tokens_and_logprobs(asyncio.run(together()))
        static_decoder = StaticDecoder(engine.model, engine.core.kv_cache, 6, 16, capture=False, query_lengths=(1, 4))
        rows_per_step = []
        real_run = static_decoder.run

        def recording_run(token_rows, starts, block_tables):
            rows_per_step.append([len(row) for row in token_rows])
            return real_run(token_rows, starts, block_tables)

        static_decoder.run = recording_run
        engine.core.runner.static_decoder = static_decoder
        tokens, scores = tokens_and_logprobs(asyncio.run(together()))
    finally:
        engine.shutdown()
    assert tokens == expected_tokens
    assert scores == pytest.approx(expected_scores, abs=1e-4)
    assert any(max(rows) > 1 for rows in rows_per_step)  # prompt ends of 2-4 tokens went static


def test_gpu_cache_is_released_when_the_engine_goes_idle_not_between_overlapping_requests(
    own_model_dir, own_tokenizer_dir
):
    engine = Engine(
        load_openelm(own_model_dir, show_progress=False),
        load_tokenizer(own_tokenizer_dir),
        EngineConfig(max_model_len=256, max_batch_size=4),
    )
    releases = []
    engine._release_cached_memory = lambda: releases.append(engine.stats().running)
    engine.start()
    try:

        async def overlapping():
            return await asyncio.gather(run(engine, [1, 5], greedy(30)), run(engine, [1, 6], greedy(5), delay=0.02))

        asyncio.run(overlapping())
        time.sleep(0.3)
        assert releases == [0]  # once, after both: never while a batch was running
        asyncio.run(run(engine, [1, 7], greedy(3)))
        time.sleep(0.3)
        assert releases == [0, 0]
    finally:
        engine.shutdown()

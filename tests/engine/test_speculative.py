"""Speculative decoding: proposed tokens verified by the model in one step, answers unchanged.

With a draft model, the model drafting for itself proposes what it then picks: every proposal
must be accepted.

Besides the n-gram proposer itself, the engine runs here with proposers that are always right
(the answer computed without speculation, as a perfect draft model would propose it) and always
wrong: every proposal must be accepted by the first and none by the second, and the answers must
be those of plain decoding either way.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import assert_no_blocks_held, greedy, make_engine, reference, run_one_by_one, run_together

from openelm_server.engine import core
from openelm_server.engine.async_engine import Engine
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.piecewise_graphs import PiecewiseStep
from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.speculative import propose_ngram
from openelm_server.model.loader import load_openelm
from openelm_server.tokenizer import load_tokenizer

# Repeating patterns: once the answer repeats them, the n-gram proposals come true.
REPETITIVE_PROMPTS = [
    [1] + [300, 301, 302, 303, 304, 305] * 8,
    [1] + list(range(400, 420)) * 3,
    [1] + [50, 60] * 20,
]


def test_ngram_proposals_follow_the_latest_earlier_occurrence_of_the_longest_suffix():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 4], 2) == []
    assert propose_ngram([5, 2, 3, 9, 2, 3, 7, 8, 2, 3], 2) == [7, 8]  # "2 3" occurs twice: the latest wins
    assert propose_ngram([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2) == [9, 2]  # the longest suffix first
    assert propose_ngram([5, 6, 7, 5, 6, 8, 9, 6], 2) == [8, 9]  # no 3- or 2-gram match: the last token alone
    assert propose_ngram([1, 2, 3, 4], 3) == []  # nothing repeats
    assert propose_ngram([4, 4], 5) == [4]  # what follows runs out
    assert propose_ngram([7], 4) == [] and propose_ngram([1, 2, 1], 0) == []


def test_reference_answers_with_ngram_speculation(shared_model_dir, shared_tokenizer_dir):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    expected = [case["greedy_ids"] for case in ref["cases"]]
    engine = make_engine(
        shared_model_dir, shared_tokenizer_dir, max_batch_size=8, max_num_batched_tokens=16, speculative="ngram"
    )
    try:
        assert run_one_by_one(engine, jobs) == expected
        assert run_together(engine, jobs * 2) == expected * 2
        stats = engine.stats()
        # Some proposals come true and some do not: both ways of verification are exercised.
        assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def plain_and_speculative(model_dir, tokenizer_dir, jobs, **config) -> tuple[list[list[int]], object]:
    """The answers without speculation, and the engine stats of a speculative run that must
    give the same answers (asserted)."""
    plain = make_engine(model_dir, tokenizer_dir, max_batch_size=8, **config)
    try:
        expected = run_together(plain, jobs)
    finally:
        plain.shutdown()
    engine = make_engine(model_dir, tokenizer_dir, max_batch_size=8, speculative="ngram", **config)
    try:
        assert run_together(engine, jobs) == expected
        assert run_one_by_one(engine, jobs) == expected
        assert_no_blocks_held(engine)
        return expected, engine.stats()
    finally:
        engine.shutdown()


def test_repetitive_answers_accept_proposals(shared_model_dir, shared_tokenizer_dir):
    jobs = [(prompt, greedy(40)) for prompt in REPETITIVE_PROMPTS]
    _, stats = plain_and_speculative(shared_model_dir, shared_tokenizer_dir, jobs, num_speculative_tokens=5)
    assert stats.spec_accepted_tokens > 0


def test_batched_with_sampled_penalized_and_logprob_requests(shared_model_dir, shared_tokenizer_dir):
    prompt = REPETITIVE_PROMPTS[0]
    jobs = [
        (prompt, greedy(30)),
        (prompt, SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, ignore_eos=True)),
        (REPETITIVE_PROMPTS[1], greedy(25, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)),
        (REPETITIVE_PROMPTS[2], greedy(20, logprobs=2)),
        (REPETITIVE_PROMPTS[0], greedy(6, logprobs=1, prompt_logprobs=1)),
        (REPETITIVE_PROMPTS[2], greedy(33, min_tokens=10, logit_bias=((305, 5.0),))),
        (REPETITIVE_PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=5, seed=9)),
    ]
    plain_and_speculative(shared_model_dir, shared_tokenizer_dir, jobs, max_num_batched_tokens=24)


class FixedProposer:
    """Proposes for a prompt the tokens of a given answer that follow what is generated so far
    (``junk`` after it), or always ``wrong`` tokens; counts what it proposed."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], junk: list[int] = (), wrong: int | None = None):
        self.answers = answers
        self.junk = list(junk)
        self.wrong = wrong

    def __call__(self, token_ids: list[int], num_tokens: int) -> list[int]:
        if self.wrong is not None:
            return [self.wrong] * num_tokens
        for prompt, answer in self.answers.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                return (answer[done:] + self.junk)[:num_tokens]
        raise AssertionError("a proposal for an unknown prompt")


def test_right_proposals_are_all_accepted_and_wrong_ones_none(shared_model_dir, shared_tokenizer_dir, monkeypatch):
    jobs = [(prompt, greedy(30)) for prompt in REPETITIVE_PROMPTS] + [([1, 900, 901, 902], greedy(17))]
    plain = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8)
    try:
        expected = run_together(plain, jobs)
    finally:
        plain.shutdown()
    answers = {tuple(prompt): answer for (prompt, _), answer in zip(jobs, expected)}
    right = FixedProposer(answers)
    for proposer, all_accepted in ((right, True), (FixedProposer(answers, wrong=7), False)):
        monkeypatch.setattr(core, "propose_ngram", proposer)
        engine = make_engine(
            shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram", num_speculative_tokens=6
        )
        try:
            assert run_together(engine, jobs) == expected
            stats = engine.stats()
            assert stats.spec_draft_tokens > 0
            assert stats.spec_accepted_tokens == (stats.spec_draft_tokens if all_accepted else 0)
            assert_no_blocks_held(engine)
        finally:
            engine.shutdown()


def test_max_new_tokens_and_eos_cut_an_accepted_run(shared_model_dir, shared_tokenizer_dir, monkeypatch):
    eos = 2
    prompt = REPETITIVE_PROMPTS[0]
    # EOS is banned until min_tokens and then, with its bias, the model's pick: the answer ends there.
    ending = SamplingParams(max_new_tokens=40, min_tokens=9, logit_bias=((eos, 100.0),))
    plain = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8)
    try:
        (full,) = run_one_by_one(plain, [(prompt, greedy(40))])
        (ended,) = run_one_by_one(plain, [(prompt, ending)])
    finally:
        plain.shutdown()
    assert len(ended) == 10 and ended[-1] == eos and eos not in ended[:-1]
    engine = make_engine(
        shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram", num_speculative_tokens=8
    )
    try:
        # Proposals run on past the end: the answer stops at max_new_tokens and at EOS all the same.
        monkeypatch.setattr(core, "propose_ngram", FixedProposer({tuple(prompt): full}, junk=[5] * 16))
        for n in (1, 2, 5, 9, 11):
            assert run_one_by_one(engine, [(prompt, greedy(n))]) == [full[:n]]
        monkeypatch.setattr(core, "propose_ngram", FixedProposer({tuple(prompt): ended}, junk=[eos, 11, 12]))
        assert run_one_by_one(engine, [(prompt, ending)]) == [ended]
        # EOS proposed from the start is rejected while min_tokens bans it.
        monkeypatch.setattr(core, "propose_ngram", FixedProposer({}, wrong=eos))
        assert run_one_by_one(engine, [(prompt, ending)]) == [ended]
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_a_stop_string_inside_an_accepted_run_ends_the_answer_there(
    shared_model_dir, shared_tokenizer_dir, monkeypatch
):
    prompt = REPETITIVE_PROMPTS[0]

    async def answer(engine, params):
        events = [event async for event in engine.generate(prompt, params)]
        tokens = [t for event in events for t in event.token_ids]
        return "".join(e.text for e in events), tokens, events[-1].completion_tokens, events[-1].finish_reason

    plain = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8)
    try:
        (full,) = run_one_by_one(plain, [(prompt, greedy(30))])
        text = asyncio.run(answer(plain, greedy(30)))[0]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        expected = asyncio.run(answer(plain, greedy(30, stop=(stop,))))
    finally:
        plain.shutdown()
    assert expected[3] == "stop" and expected[2] < 30
    monkeypatch.setattr(core, "propose_ngram", FixedProposer({tuple(prompt): full}))
    engine = make_engine(
        shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram", num_speculative_tokens=8
    )
    try:
        assert asyncio.run(answer(engine, greedy(30, stop=(stop,)))) == expected
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_rejected_proposals_never_enter_the_prefix_cache(shared_model_dir, shared_tokenizer_dir, monkeypatch):
    """Every proposal is wrong, so every step writes keys and values of tokens that are not the
    answer's; a later prompt made of the prompt and answer takes their blocks from the cache and
    must still answer as without any cache."""
    prompt = REPETITIVE_PROMPTS[1]
    monkeypatch.setattr(core, "propose_ngram", FixedProposer({}, wrong=7))
    engine = make_engine(
        shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram", num_speculative_tokens=16
    )
    try:
        (answer,) = run_one_by_one(engine, [(prompt, greedy(50))])
        follow_up = prompt + answer + [9]
        (cached,) = run_one_by_one(engine, [(follow_up, greedy(10))])
        assert engine.stats().prefix_cache_hits >= len(prompt) + len(answer) - 16
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()
    plain = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8, prefix_caching=False)
    try:
        assert run_one_by_one(plain, [(prompt, greedy(50)), (follow_up, greedy(10))]) == [answer, cached]
    finally:
        plain.shutdown()


def test_an_aborted_speculating_request_frees_its_blocks(shared_model_dir, shared_tokenizer_dir):
    engine = make_engine(shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram")

    async def cancel_after_a_few_events():
        stream = engine.generate(REPETITIVE_PROMPTS[2], greedy(200))
        for _ in range(3):
            await anext(stream)
        stream.cancel()

    try:
        asyncio.run(cancel_after_a_few_events())
        for _ in range(100):
            if engine.stats().kv_blocks_used == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_speculation_counters_over_http(shared_model_dir, shared_tokenizer_dir, caplog):
    from in_process import InProcessServer

    server = InProcessServer(shared_model_dir, shared_tokenizer_dir, speculative="ngram")
    try:
        assert server.metric("openelm_spec_decode_num_draft_tokens_total") == 0
        body = {"model": server.model, "max_tokens": 40, "temperature": 0, "prompt": "one two three " * 10}
        with caplog.at_level("INFO", logger="openelm_server"):
            server.post_ok("/v1/completions", body)
        proposed = server.metric("openelm_spec_decode_num_draft_tokens_total")
        accepted = server.metric("openelm_spec_decode_num_accepted_tokens_total")
        assert 0 < accepted <= proposed
        assert f"speculative decoding: {accepted:.0f} of {proposed:.0f} proposed tokens accepted" in caplog.text
    finally:
        server.close()


def self_drafting_engine(model_dir, tokenizer_dir, **config) -> Engine:
    engine = Engine(
        load_openelm(model_dir, show_progress=False),
        load_tokenizer(tokenizer_dir),
        EngineConfig(**{"max_model_len": 256, "max_batch_size": 8, "speculative": "draft", **config}),
        draft=load_openelm(model_dir, show_progress=False),
    )
    engine.start()
    return engine


def test_the_model_as_its_own_draft_has_every_proposal_accepted(shared_model_dir, shared_tokenizer_dir):
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    expected = [case["greedy_ids"] for case in ref["cases"]]
    engine = self_drafting_engine(shared_model_dir, shared_tokenizer_dir, max_num_batched_tokens=16)
    try:
        assert run_one_by_one(engine, jobs) == expected
        # Again from the prefix cache, batched with sampled requests that do not speculate.
        sampled = [(prompt, SamplingParams(max_new_tokens=10, temperature=0.9, seed=1)) for prompt, _ in jobs]
        assert run_together(engine, jobs + sampled)[: len(jobs)] == expected
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_a_self_drafting_engine_recomputes_its_draft_cache_after_preemption(shared_model_dir, shared_tokenizer_dir):
    ref = reference(shared_model_dir)
    engine = self_drafting_engine(
        shared_model_dir,
        shared_tokenizer_dir,
        max_model_len=128,
        kv_cache_tokens=128,
        max_num_batched_tokens=32,
        num_speculative_tokens=3,
    )
    try:
        jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]] * 3
        assert run_together(engine, jobs) == [case["greedy_ids"] for case in ref["cases"]] * 3
        stats = engine.stats()
        assert stats.preemptions > 0
        assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()


def test_a_draft_of_another_vocabulary_is_refused(shared_model_dir, own_model_dir, own_tokenizer_dir):
    with pytest.raises(ValueError, match="the draft model's vocabulary has 32000 tokens"):
        Engine(
            load_openelm(own_model_dir, show_progress=False),
            load_tokenizer(own_tokenizer_dir),
            EngineConfig(max_model_len=256, speculative="draft"),
            draft=load_openelm(shared_model_dir, show_progress=False),
        )


def test_draft_speculation_over_http(shared_model_dir, shared_tokenizer_dir):
    from in_process import InProcessServer

    server = InProcessServer(
        shared_model_dir, shared_tokenizer_dir, speculative="draft", draft_model_path=str(shared_model_dir)
    )
    try:
        body = {"model": server.model, "max_tokens": 20, "temperature": 0, "prompt": "Hello there"}
        server.post_ok("/v1/completions", body)
        proposed = server.metric("openelm_spec_decode_num_draft_tokens_total")
        assert proposed > 0 and server.metric("openelm_spec_decode_num_accepted_tokens_total") == proposed
    finally:
        server.close()


def test_start_up_refuses_a_draft_of_another_vocabulary(shared_model_dir, own_model_dir, own_tokenizer_dir):
    from openelm_server.config import Settings
    from openelm_server.startup import StartupError, build_engine

    settings = Settings(
        model_path=str(own_model_dir),
        tokenizer_path=str(own_tokenizer_dir),
        draft_model_path=str(shared_model_dir),
        speculative="draft",
        device="cpu",
    )
    with pytest.raises(StartupError, match="--draft-model-path must share the model's tokenizer"):
        build_engine(settings)


def test_the_draft_reads_a_long_prompt_within_the_step_token_budget(shared_model_dir, shared_tokenizer_dir):
    """A request's first decode finds its whole prompt unread by the draft: the draft reads it
    over several steps, at most --max-num-batched-tokens a step, proposing nothing meanwhile."""
    ref = reference(shared_model_dir)
    long_prompt = [token for case in ref["cases"] for token in case["prompt_ids"]] * 8
    jobs = [(long_prompt[:100], greedy(24)), (ref["cases"][0]["prompt_ids"], greedy(24))]
    plain = make_engine(shared_model_dir, shared_tokenizer_dir, max_num_batched_tokens=16)
    try:
        expected = run_together(plain, jobs)
    finally:
        plain.shutdown()
    engine = self_drafting_engine(shared_model_dir, shared_tokenizer_dir, max_num_batched_tokens=16)
    runner = engine.core.draft_proposer.runner
    read_per_call = []
    real_run = runner.run

    def counting_run(scheduled, wanted):
        read_per_call.append(sum(s.num_tokens for s in scheduled))
        return real_run(scheduled, wanted)

    runner.run = counting_run
    try:
        assert run_together(engine, jobs) == expected
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()
    assert max(read_per_call) <= 16
    assert sum(read_per_call) >= 100  # the long prompt was read, over several steps


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_verify_steps_and_draft_steps_through_static_shapes_answer_alike(
    shared_model_dir, shared_tokenizer_dir, method
):
    """The CUDA-graph path of speculation, run eagerly: a verify step (each request's newest
    token and its proposals, rows padded to 1 + K tokens) and the draft's one-token steps go
    through static decoders, the steps that read prompts (the model's, and the draft's catching
    up) through piecewise steps, as on CUDA; the answers stay the reference's."""
    ref = reference(shared_model_dir)
    jobs = [(case["prompt_ids"], greedy(ref["new_tokens"])) for case in ref["cases"]]
    expected = [case["greedy_ids"] for case in ref["cases"]]
    if method == "draft":
        engine = self_drafting_engine(shared_model_dir, shared_tokenizer_dir, num_speculative_tokens=3)
    else:
        engine = make_engine(
            shared_model_dir, shared_tokenizer_dir, max_batch_size=8, speculative="ngram", num_speculative_tokens=3
        )
    core = engine.core
    static = StaticDecoder(core.model, core.kv_cache, 8, 16, capture=False, query_lengths=(1, 4))
    tokens_per_row = []
    real_run = static.run

    def recording_run(token_rows, starts, block_tables):
        tokens_per_row.extend(len(row) for row in token_rows)
        return real_run(token_rows, starts, block_tables)

    static.run = recording_run
    core.runner.static_decoder = static
    budget = core.scheduler.max_num_batched_tokens
    piecewise_steps = []  # (runner, tokens) of each step that went through pieces

    def pieces_for(runner, name):
        piecewise = PiecewiseStep(runner.model, runner.kv_cache, budget)
        real_pieces = piecewise.run

        def recording_pieces(tokens, positions, slots, groups):
            piecewise_steps.append((name, len(tokens)))
            return real_pieces(tokens, positions, slots, groups)

        piecewise.run = recording_pieces
        runner.piecewise = piecewise

    pieces_for(core.runner, "model")
    draft_steps = []
    if method == "draft":
        draft_runner = core.draft_proposer.runner
        pieces_for(draft_runner, "draft")
        draft_static = StaticDecoder(draft_runner.model, draft_runner.kv_cache, 8, 16, capture=False)
        real_draft_run = draft_static.run

        def recording_draft_run(token_rows, starts, block_tables):
            draft_steps.append(len(token_rows))
            return real_draft_run(token_rows, starts, block_tables)

        draft_static.run = recording_draft_run
        draft_runner.static_decoder = draft_static
    try:
        assert run_together(engine, jobs * 2) == expected * 2
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0
        if method == "draft":
            assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert_no_blocks_held(engine)
    finally:
        engine.shutdown()
    # Verify steps ran through the static decoder: a self-draft always proposes K (rows of 4);
    # n-gram proposals vary, so rows of 1 to 4 tokens were padded to 4 in the same steps.
    assert 4 in tokens_per_row
    if method == "ngram":
        assert 1 in tokens_per_row and {2, 3} & set(tokens_per_row)
    else:
        assert draft_steps  # the draft's one-token steps too
    # Prompts were read through pieces: the model's, and the draft's catching up with them.
    assert {name for name, _ in piecewise_steps} == ({"model", "draft"} if method == "draft" else {"model"})

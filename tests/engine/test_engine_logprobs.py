"""The engine's side of logprobs, min_tokens and max_new_tokens 0, in-process without HTTP:
logprobs only for the requests that ask, unchanged by the batch they run in."""

from __future__ import annotations

import asyncio

import pytest
import torch

from openelm_server.engine.async_engine import Engine
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.output import StopStringMatcher
from openelm_server.engine.sampling import SamplingParams
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch
from openelm_server.tokenizer import load_tokenizer

PROMPTS = [[1, 5, 9, 30, 31], [1, 70, 71], [1, 100, 101, 102, 103, 104, 105]]


@pytest.fixture(scope="module")
def engine(own_model_dir, own_tokenizer_dir):
    engine = Engine(
        load_openelm(own_model_dir, show_progress=False),
        load_tokenizer(own_tokenizer_dir),
        EngineConfig(max_batch_size=4, max_model_len=256),
    )
    engine.start()
    yield engine
    engine.shutdown()


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list]:
    async def one(prompt_ids, params):
        return [event async for event in engine.generate(prompt_ids, params)]

    async def main():
        return await asyncio.gather(*(one(p, s) for p, s in jobs))

    return asyncio.run(main())


def test_only_the_requests_that_ask_get_logprobs(engine):
    asking = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    plain = SamplingParams(max_new_tokens=4, ignore_eos=True)
    events = run_all(engine, [(PROMPTS[0], asking), (PROMPTS[1], plain), (PROMPTS[2], plain)])
    assert [len(e.logprobs) for e in events[0]] == [1, 1, 1, 1]
    assert all(len(e.logprobs[0].top) == 3 for e in events[0])
    assert all(e.logprobs == () and e.prompt_logprobs is None for e in events[1] + events[2])
    prompt_scores = events[0][0].prompt_logprobs
    assert prompt_scores[0] is None and len(prompt_scores) == len(PROMPTS[0])
    assert [s.token_id for s in prompt_scores[1:]] == PROMPTS[0][1:]
    assert all(len(s.top) == 2 for s in prompt_scores[1:])


def test_logprobs_alone_equal_logprobs_in_a_batch(engine):
    asking = SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    (alone,) = run_all(engine, [(PROMPTS[2], asking)])
    batch = run_all(engine, [(PROMPTS[0], asking), (PROMPTS[2], asking), (PROMPTS[1], asking)])[1]
    assert [e.token_ids for e in alone] == [e.token_ids for e in batch]
    for a, b in zip(alone, batch):
        assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=1e-4)
    for a, b in zip(alone[0].prompt_logprobs[1:], batch[0].prompt_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_generated_logprobs_are_log_softmax_of_the_model(engine, own_model_dir):
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=0)
    (events,) = run_all(engine, [(PROMPTS[0], params)])
    sequence = PROMPTS[0] + [e.token_ids[0] for e in events]
    model = engine.model
    cache = model.new_kv_cache(1, len(sequence))
    with torch.inference_mode():
        positions = torch.arange(len(sequence)).unsqueeze(0)
        hidden = model(torch.tensor([sequence]), ForwardBatch.build(cache, [0], positions))
        expected = torch.log_softmax(model.logits(hidden[0]).float(), -1)
    for step, event in enumerate(events):
        position = len(PROMPTS[0]) - 1 + step
        assert event.logprobs[0].logprob == pytest.approx(float(expected[position, sequence[position + 1]]), abs=1e-4)


def test_max_new_tokens_zero_scores_the_prompt_only(engine):
    (events,) = run_all(engine, [(PROMPTS[1], SamplingParams(max_new_tokens=0, prompt_logprobs=0))])
    (event,) = events
    assert event.token_ids == () and event.finish_reason == "length" and event.completion_tokens == 0
    assert len(event.prompt_logprobs) == len(PROMPTS[1])


def test_stop_strings_wait_for_min_tokens():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.add("aSTOPb", may_stop=False) == "aSTOPb"
    assert not matcher.stopped
    assert matcher.add("cST") == "c"
    assert matcher.add("OPd") == ""
    assert matcher.stopped and matcher.text == "aSTOPbc"

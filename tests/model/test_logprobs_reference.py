"""Served logprobs against references: the shared fixture's reference.json (computed apart
from this project) and a float32 full recompute with our model, within 1e-3."""

from __future__ import annotations

import json

import pytest
import torch
from in_process import InProcessServer

from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference(shared_model_dir) -> dict:
    return json.loads((shared_model_dir / "reference.json").read_text())


@pytest.fixture(scope="module")
def app(shared_model_dir, shared_tokenizer_dir):
    server = InProcessServer(shared_model_dir, shared_tokenizer_dir)
    yield server
    server.close()


def full_recompute_logprobs(model_dir, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position, the whole sequence in one float32 forward
    pass (no cache reuse, no batching): row i is the distribution of token i + 1."""
    model = load_openelm(model_dir, dtype=torch.float32, show_progress=False)
    cache = model.new_kv_cache(1, len(token_ids))
    with torch.inference_mode():
        positions = torch.arange(len(token_ids)).unsqueeze(0)
        hidden = model(torch.tensor([token_ids]), ForwardBatch.build(cache, [0], positions))
        return torch.log_softmax(model.logits(hidden[0]).float(), dim=-1)


def served(app, body: dict) -> dict:
    response = app.post("/v1/completions", {"temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_last_position_logprobs_equal_reference_logits_minus_logsumexp(app, reference):
    """Each case's prompt followed by token j (j < 16, the reference's logits head) as a
    token-id prompt: the logprob of that last token is logit_j - logsumexp of the reference."""
    for case in reference["cases"]:
        head = case["last_logits_head"]
        prompts = [case["prompt_ids"] + [token] for token in range(len(head))]
        result = served(app, {"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 0})
        for token, choice in enumerate(result["choices"]):
            expected = head[token] - case["last_logits_logsumexp"]
            assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(expected, abs=TOLERANCE), (case, token)


def test_first_greedy_token_is_the_most_likely_and_its_logprob_is_consistent(app, reference):
    for case in reference["cases"]:
        result = served(app, {"prompt": case["prompt_ids"], "max_tokens": 1, "logprobs": 5})
        logprobs = result["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] == pytest.approx(max(logprobs["top_logprobs"][0].values()), abs=1e-6)
        # The reference's argmax is the greedy token; its probability is at least any head token's.
        assert case["last_logits_argmax"] == case["greedy_ids"][0]
        best_head = max(case["last_logits_head"]) - case["last_logits_logsumexp"]
        assert logprobs["token_logprobs"][0] >= best_head


def test_prompt_and_generated_logprobs_equal_a_float32_full_recompute(app, reference, shared_model_dir):
    for case in reference["cases"]:
        sequence = case["prompt_ids"] + case["greedy_ids"]
        expected = full_recompute_logprobs(shared_model_dir, sequence)
        # Prompt logprobs: the whole reference sequence echoed, nothing generated.
        echoed = served(app, {"prompt": sequence, "echo": True, "max_tokens": 0, "logprobs": 0})
        token_logprobs = echoed["choices"][0]["logprobs"]["token_logprobs"]
        assert token_logprobs[0] is None
        want = [float(expected[i, sequence[i + 1]]) for i in range(len(sequence) - 1)]
        assert token_logprobs[1:] == pytest.approx(want, abs=TOLERANCE)
        # Generated logprobs: the greedy continuation of the prompt, token for token.
        generated = served(
            app,
            {"prompt": case["prompt_ids"], "max_tokens": len(case["greedy_ids"]), "logprobs": 0, "ignore_eos": True},
        )
        got = generated["choices"][0]["logprobs"]["token_logprobs"]
        start = len(case["prompt_ids"]) - 1
        assert got == pytest.approx(want[start:], abs=TOLERANCE)

"""The CPU's linear kernels: oneDNN and PyTorch timed on the loaded model at start-up, the faster
kept, the weights held once either way, and the answers the same whichever wins."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from openelm_server.config import load_settings
from openelm_server.model import linear_choice
from openelm_server.model.cpu_linear import OneDnnLinear, can_use_onednn, use_onednn_linears, use_plain_linears
from openelm_server.model.linear_choice import choose_linear_kernels
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM


@torch.inference_mode()
def last_logits(model: OpenELM) -> torch.Tensor:
    prompt = torch.tensor([[1, 4, 8, 15, 16, 23, 42]])
    cache = model.new_kv_cache(1, prompt.shape[1])
    return model.logits(model(prompt, ForwardBatch.build(cache, [0], torch.arange(prompt.shape[1]).unsqueeze(0))))


@pytest.fixture
def model(own_model_dir) -> OpenELM:
    model = load_openelm(own_model_dir, dtype=torch.float32)
    if not can_use_onednn(model):
        pytest.skip("oneDNN is not available in this torch build")
    return model


def kernels(model: OpenELM) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.Linear, OneDnnLinear))}


def test_plain_linears_come_back_exactly(model):
    expected = last_logits(model)
    use_onednn_linears(model)
    assert kernels(model) == {OneDnnLinear}
    use_plain_linears(model)
    assert kernels(model) == {nn.Linear}
    assert model.lm_head is None  # tied embeddings again: the logits read the embedding
    assert torch.equal(last_logits(model), expected)


@pytest.mark.parametrize("onednn_faster", [True, False])
def test_the_faster_kernels_are_kept_and_logged(model, monkeypatch, caplog, onednn_faster):
    expected = last_logits(model)
    timings = iter([20.0, 10.0] if onednn_faster else [10.0, 20.0])  # PyTorch first, then oneDNN
    monkeypatch.setattr(linear_choice, "time_steps", lambda model: next(timings))
    with caplog.at_level(logging.INFO, logger="openelm_server.model.linear_choice"):
        assert choose_linear_kernels(model) is onednn_faster
    assert kernels(model) == ({OneDnnLinear} if onednn_faster else {nn.Linear})
    assert f"using {'oneDNN' if onednn_faster else 'PyTorch'}" in caplog.text
    assert torch.allclose(last_logits(model), expected, atol=1e-4)


def test_the_timing_runs_on_the_real_model(model):
    assert linear_choice.time_steps(model) > 0


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        ([], {}, None),
        (["--onednn-linear"], {}, True),
        (["--no-onednn-linear"], {}, False),
        ([], {"ONEDNN_LINEAR": "0"}, False),
        ([], {"ONEDNN_LINEAR": "1"}, True),
    ],
)
def test_unset_means_timed_and_flags_force_one(argv, environ, expected):
    assert load_settings(argv, environ).onednn_linear is expected

"""The CPU's linear kernels: oneDNN and PyTorch timed on the loaded model at start-up, the faster
kept, the weights held once either way, and the answers the same whichever wins. bfloat16 models
get oneDNN only on CPUs with bfloat16 instructions (the bfloat16 tests take the branch this CPU
allows: an AVX-512 or AMX machine runs oneDNN's bfloat16 path, others check the refusal)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from openelm_server import startup
from openelm_server.config import Settings, load_settings
from openelm_server.model import linear_choice
from openelm_server.model.cpu_linear import OneDnnLinear, can_use_onednn, use_onednn_linears, use_plain_linears
from openelm_server.model.linear_choice import choose_linear_kernels
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.startup import StartupError, build_engine


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


BF16_ONEDNN = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_a_bfloat16_model_uses_onednn_exactly_where_the_cpu_has_bfloat16_instructions(own_model_dir):
    model = load_openelm(own_model_dir, dtype=torch.bfloat16)
    assert can_use_onednn(model) == BF16_ONEDNN
    if not BF16_ONEDNN:
        with pytest.raises(ValueError, match="bfloat16 instructions"):
            use_onednn_linears(model)
        return
    expected = last_logits(model).float()
    use_onednn_linears(model)
    assert kernels(model) == {OneDnnLinear}
    got = last_logits(model).float()
    # Both sum bfloat16 products in float32; they may round the output apart by a bfloat16 step.
    assert (got - expected).norm() / expected.norm() < 2e-2


def test_onednn_forced_where_it_cannot_run_stops_the_start_up_before_the_load(
    own_model_dir, own_tokenizer_dir, monkeypatch
):
    settings = Settings(
        model_path=str(own_model_dir),
        tokenizer_path=str(own_tokenizer_dir),
        device="cpu",
        dtype="bfloat16",
        onednn_linear=True,
        max_batch_size=2,
        max_model_len=64,
    )
    if BF16_ONEDNN:
        engine, _ = build_engine(settings)
        assert kernels(engine.core.model) == {OneDnnLinear}
        return

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flag was refused")

    monkeypatch.setattr(startup, "load_openelm", no_load)
    with pytest.raises(
        StartupError, match="--onednn-linear: .* this server runs bfloat16 on cpu: drop --onednn-linear"
    ):
        build_engine(settings)

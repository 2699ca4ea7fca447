"""The CPU's linear kernels: ours, oneDNN's and PyTorch's timed on the loaded model at start-up,
the fastest kept (ours unless another is clearly faster), the weights held once whichever wins,
and the answers the same. bfloat16 models get oneDNN only on CPUs with bfloat16 instructions (the
bfloat16 tests take the branch this CPU allows: an AVX-512 or AMX machine runs oneDNN's bfloat16
path, others check the refusal), and never our float32 kernel; ours holds their bfloat16 weights
with float32 activations, timed against bfloat16 throughout."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from openelm_server import startup
from openelm_server.config import Settings, load_settings
from openelm_server.model import linear_choice
from openelm_server.model.cpu_linear import (
    OneDnnLinear,
    PanelLinear,
    bfloat16_weights_run,
    kernels_that_run,
    linear_kernel,
    use_linears,
    use_plain_linears,
)
from openelm_server.model.linear_choice import choose_linear_kernels
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.startup import StartupError, build_engine

LAYERS = {"own": PanelLinear, "onednn": OneDnnLinear, "pytorch": nn.Linear}


@torch.inference_mode()
def last_logits(model: OpenELM) -> torch.Tensor:
    prompt = torch.tensor([[1, 4, 8, 15, 16, 23, 42]])
    cache = model.new_kv_cache(1, prompt.shape[1])
    return model.logits(model(prompt, ForwardBatch.build(cache, [0], torch.arange(prompt.shape[1]).unsqueeze(0))))


@pytest.fixture
def model(own_model_dir) -> OpenELM:
    model = load_openelm(own_model_dir, dtype=torch.float32)
    if kernels_that_run(model) != ["own", "onednn", "pytorch"]:
        pytest.skip(f"only {kernels_that_run(model)} run here (oneDNN missing from torch, or our kernel did not build)")
    return model


def kernels(model: OpenELM) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.Linear, OneDnnLinear, PanelLinear))}


@pytest.mark.parametrize("kernel", ["own", "onednn"])
def test_plain_linears_come_back_exactly(model, kernel):
    expected = last_logits(model)
    use_linears(model, kernel)
    assert kernels(model) == {LAYERS[kernel]} and linear_kernel(model) == kernel
    assert isinstance(model.lm_head, LAYERS[kernel])  # tied embeddings: the logits get their own copy
    held = model.lm_head.weight
    use_linears(model, kernel)  # already held for it: not laid out again
    assert model.lm_head.weight is held
    use_plain_linears(model)
    assert kernels(model) == {nn.Linear} and linear_kernel(model) == "pytorch"
    assert model.lm_head is None  # tied embeddings again: the logits read the embedding
    assert torch.equal(last_logits(model), expected)


@pytest.mark.parametrize(
    "timings, kept",
    [
        ({"pytorch": 30.0, "onednn": 20.0, "own": 10.0}, "own"),
        ({"pytorch": 30.0, "onednn": 10.0, "own": 20.0}, "onednn"),
        ({"pytorch": 10.0, "onednn": 20.0, "own": 30.0}, "pytorch"),
        # within OWN_KERNEL_MARGIN of ours: ours, so that noise does not change the answers
        ({"pytorch": 30.0, "onednn": 9.5, "own": 10.0}, "own"),
        ({"pytorch": 30.0, "onednn": 8.5, "own": 10.0}, "own"),
        ({"pytorch": 30.0, "onednn": 8.0, "own": 10.0}, "onednn"),
    ],
)
def test_the_fastest_kernels_are_kept_and_logged(model, monkeypatch, caplog, timings, kept):
    expected = last_logits(model)
    timed = []

    def time_requests(model):
        (kernel,) = [name for name, layer in LAYERS.items() if kernels(model) == {layer}]
        timed.append(kernel)
        return timings[kernel]

    monkeypatch.setattr(linear_choice, "time_requests", time_requests)
    with caplog.at_level(logging.INFO, logger="openelm_server.model.linear_choice"):
        assert choose_linear_kernels(model) == kept
    assert sorted(timed) == sorted(timings)
    assert kernels(model) == {LAYERS[kept]}
    line = caplog.records[-1].getMessage()
    own, onednn, pytorch = (timings[kernel] for kernel in ("own", "onednn", "pytorch"))
    assert f"ours {own:.0f} ms, oneDNN {onednn:.0f} ms, PyTorch {pytorch:.0f} ms" in line
    assert f"using {linear_choice.KERNEL_NAMES[kept]} (--cpu-linear to force one)" in line
    assert torch.allclose(last_logits(model), expected, atol=1e-4)


@pytest.mark.parametrize(
    "timings, kept",
    [
        ({"pytorch": 30.0, "onednn": 20.0, "own": 10.0}, "own"),
        ({"pytorch": 30.0, "onednn": 9.0, "own": 10.0}, "own"),  # within the margin: ours
        ({"pytorch": 30.0, "onednn": 5.0, "own": 10.0}, "onednn"),
        ({"pytorch": 5.0, "onednn": 30.0, "own": 10.0}, "pytorch"),
    ],
)
def test_a_bfloat16_model_is_timed_with_its_weights_in_our_kernel_too(
    own_model_dir, monkeypatch, caplog, timings, kept
):
    # Where the CPU has bfloat16 instructions, start-up times bfloat16 throughout (oneDNN's or
    # PyTorch's kernels) against bfloat16 weights in ours with float32 activations.
    model = load_openelm(own_model_dir, dtype=torch.bfloat16)
    if not bfloat16_weights_run(torch.device("cpu"), torch.bfloat16):
        pytest.skip("our kernels do not build here")
    timings = {kernel: ms for kernel, ms in timings.items() if kernel in kernels_that_run(model) or kernel == "own"}
    if kept not in timings:
        pytest.skip(f"{kept} does not run bfloat16 here")
    expected = last_logits(model)

    def time_requests(model):
        (kernel,) = [name for name, layer in LAYERS.items() if kernels(model) == {layer}]
        return timings[kernel]

    monkeypatch.setattr(linear_choice, "time_requests", time_requests)
    with caplog.at_level(logging.INFO, logger="openelm_server.model.linear_choice"):
        assert choose_linear_kernels(model) == kept
    assert kernels(model) == {LAYERS[kept]}
    line = caplog.records[-1].getMessage()
    assert f"ours (bfloat16 weights; float32 activations and KV cache) {timings['own']:.0f} ms" in line
    embedding = model.transformer.token_embeddings.weight
    if kept == "own":
        assert embedding.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
        assert "using ours (bfloat16 weights; float32 activations and KV cache)" in line
        assert f"the token embedding twice, {embedding.numel() * 2 / 1e6:.0f} MB extra" in line
        return
    # Not ours: bfloat16 throughout again, the checkpoint's weights exactly.
    assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    if kept == "pytorch":
        assert torch.equal(last_logits(model), expected)


def test_the_timing_runs_on_the_real_model(model):
    assert linear_choice.time_requests(model) > 0


def test_without_our_kernel_the_choice_is_between_the_others(own_model_dir, monkeypatch):
    from openelm_server.model import cpu_extension

    monkeypatch.setattr(cpu_extension, "available", lambda: False)
    model = load_openelm(own_model_dir, dtype=torch.float32)
    assert "own" not in kernels_that_run(model)
    assert choose_linear_kernels(model) in ("onednn", "pytorch")
    with pytest.raises(ValueError, match="our linear kernel needs the CPU"):
        use_linears(model, "own")


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        ([], {}, "auto"),
        (["--cpu-linear", "own"], {}, "own"),
        (["--cpu-linear", "pytorch"], {}, "pytorch"),
        ([], {"CPU_LINEAR": "onednn"}, "onednn"),
        (["--cpu-linear", "auto"], {"CPU_LINEAR": "onednn"}, "auto"),
    ],
)
def test_auto_means_timed_and_the_flag_forces_one(argv, environ, expected):
    assert load_settings(argv, environ).cpu_linear == expected


def test_an_unknown_kernel_stops_start_up(capsys):
    with pytest.raises(SystemExit):
        load_settings(["--cpu-linear", "mkl"], {})
    assert "error: --cpu-linear must be auto, own, onednn or pytorch, got 'mkl'" in capsys.readouterr().err


def test_a_forced_kernel_is_what_the_server_runs(own_model_dir, own_tokenizer_dir, caplog):
    settings = Settings(
        model_path=str(own_model_dir),
        tokenizer_path=str(own_tokenizer_dir),
        device="cpu",
        cpu_linear="own",
        max_batch_size=2,
        max_model_len=64,
    )
    with caplog.at_level(logging.INFO, logger="openelm_server.startup"):
        engine, _ = build_engine(settings)
    if engine.core.model.lm_head is None or not isinstance(engine.core.model.lm_head, PanelLinear):
        pytest.fail("--cpu-linear own did not give our kernel")
    assert kernels(engine.core.model) == {PanelLinear}
    assert "linear layers run our float32 kernel, as --cpu-linear own asks" in caplog.text


BF16_ONEDNN = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_a_bfloat16_model_uses_onednn_exactly_where_the_cpu_has_bfloat16_instructions(own_model_dir):
    model = load_openelm(own_model_dir, dtype=torch.bfloat16)
    assert ("onednn" in kernels_that_run(model)) == BF16_ONEDNN
    assert "own" not in kernels_that_run(model)  # ours is float32 only
    if not BF16_ONEDNN:
        with pytest.raises(ValueError, match="bfloat16 instructions"):
            use_linears(model, "onednn")
        return
    expected = last_logits(model).float()
    use_linears(model, "onednn")
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
        cpu_linear="onednn",
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
        StartupError, match="--cpu-linear onednn: .* this server runs bfloat16 on cpu: choose another or drop"
    ):
        build_engine(settings)

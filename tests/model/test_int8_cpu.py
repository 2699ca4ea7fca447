"""int8 layers on the CPU: our kernel (cpu_matmul.py; its arithmetic is tested in test_cpu_matmul.py)
or PyTorch's, a layer switching between them, and the start-up choice."""

from __future__ import annotations

import logging

import pytest
import torch

from openelm_server.model import cpu_extension
from openelm_server.model.linear_choice import choose_int8_kernels
from openelm_server.model.quantize import Int8Linear
from openelm_server.testing.checkpoints import write_tiny_checkpoint

needs_kernel = pytest.mark.skipif(
    not cpu_extension.available(), reason="our CPU kernels do not build here (see the log)"
)


def test_without_our_kernel_int8_layers_use_pytorchs(monkeypatch):
    monkeypatch.setattr(cpu_extension, "available", lambda: False)
    layer = Int8Linear.quantize(torch.randn(24, 64), "test")
    assert layer.cpu_kernel == "pytorch"
    x = torch.randn(3, 64)
    want = x @ layer.dequantized(torch.float32).T
    assert float((layer(x) - want).abs().max() / want.abs().max()) < 0.02  # bfloat16 rounding


@needs_kernel
def test_start_up_times_both_kernels_keeps_the_faster_and_logs_both(tmp_path, caplog):
    from openelm_server.model.loader import load_openelm

    write_tiny_checkpoint(tmp_path, vocab_size=256)
    model = load_openelm(tmp_path, quantization="int8", show_progress=False)
    with caplog.at_level(logging.INFO, logger="openelm_server.model.linear_choice"):
        kept = choose_int8_kernels(model, "draft model: ")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert kept in ("own", "pytorch") and {layer.cpu_kernel for layer in layers} == {kept}
    (line,) = [r.getMessage() for r in caplog.records if "int8 kernels timed" in r.getMessage()]
    assert line.startswith("draft model: int8 kernels timed on this CPU")
    assert f"ours ({cpu_extension.matmul_isa()}, float32)" in line and "PyTorch's (bfloat16)" in line
    assert ("using ours (" if kept == "own" else "using PyTorch's (") in line


@needs_kernel
def test_a_layer_switches_kernels_with_its_weight_laid_out_for_each():
    layer = Int8Linear.quantize(torch.randn(13, 64), "test")
    assert layer.cpu_kernel == "own"
    x = torch.randn(3, 64)
    plain = layer.dequantized(torch.float32)
    own = layer(x)
    layer.use_cpu_kernel("pytorch")
    assert torch.equal(layer.dequantized(torch.float32), plain)
    pytorch = layer(x)
    assert float((own - pytorch).abs().max() / own.abs().max()) < 0.02  # PyTorch's rounds to bfloat16
    layer.use_cpu_kernel("own")
    assert torch.equal(layer(x), own)

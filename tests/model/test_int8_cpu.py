"""Our int8 CPU kernel (int8_cpu.py): float32 products of int8 weights, exact to float32 rounding,
the same numbers for a row whatever its batch, and the start-up choice between it and PyTorch's."""

from __future__ import annotations

import logging

import pytest
import torch

from openelm_server.model import int8_cpu
from openelm_server.model.linear_choice import choose_int8_kernels
from openelm_server.model.quantize import Int8Linear
from openelm_server.testing.checkpoints import write_tiny_checkpoint

kernel = int8_cpu.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="our int8 CPU kernel does not build here (see the log)")


def operands(rows: int, out_features: int, in_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) + 0.01
    return x, weight, scales


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("out_features", [4, 13, 96])  # 13: a tail after the blocks of 4
def test_products_equal_float64_to_float32_rounding(rows, out_features):
    x, weight, scales = operands(rows, out_features, 136)
    want = x.double() @ (weight.double() * scales.double()[:, None]).T
    got = kernel(x, int8_cpu.pack(weight), scales)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    size = x.double().norm(dim=1, keepdim=True) * (weight.double() * scales.double()[:, None]).norm(dim=1)
    assert float(((got.double() - want).abs() / size).max()) < 1e-6


@needs_kernel
def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads():
    x, weight, scales = operands(11, 37, 64, seed=1)
    together = kernel(x, weight, scales)
    for row in range(11):
        assert torch.equal(kernel(x[row : row + 1], weight, scales), together[row : row + 1])
    for start, stop in ((0, 4), (3, 5), (2, 11)):
        assert torch.equal(kernel(x[start:stop], weight, scales), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel(x, weight, scales), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_operands_it_cannot_take_are_refused_with_what_it_needs():
    x, weight, scales = operands(2, 8, 64)
    with pytest.raises(RuntimeError, match=r"x: float32 \[rows, in\], contiguous"):
        kernel(x.to(torch.bfloat16), weight, scales)
    with pytest.raises(RuntimeError, match=r"weight: int8 \[out, in\], contiguous"):
        kernel(x, weight.float(), scales)
    with pytest.raises(RuntimeError, match=r"in % 8 == 0"):
        kernel(x[:, :60].contiguous(), weight[:, :60].contiguous(), scales)


def test_without_our_kernel_int8_layers_use_pytorchs(monkeypatch):
    monkeypatch.setattr(int8_cpu, "load", lambda: None)
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
    assert "ours (AVX2, float32)" in line and "PyTorch's (bfloat16)" in line
    assert ("using ours (" if kept == "own" else "using PyTorch's (") in line


@pytest.mark.parametrize("out_features", [4, 13, 96])
def test_packing_keeps_every_weight_and_unpacks_to_the_plain_layout(out_features):
    _, weight, _ = operands(1, out_features, 48)
    packed = int8_cpu.pack(weight)
    assert packed.shape == weight.shape and packed.is_contiguous()
    assert torch.equal(int8_cpu.unpack(packed), weight)
    # Block 0 holds, for the first 8 inputs, row 0's 8 weights, then row 1's, row 2's, row 3's.
    assert torch.equal(packed[0, :32], weight[:4, :8].reshape(-1))
    if out_features % 4:  # rows past the last full block stay plain
        assert torch.equal(packed[out_features // 4 * 4 :], weight[out_features // 4 * 4 :])


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

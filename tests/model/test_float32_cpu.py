"""Our float32 CPU kernel (float32_cpu.py): products exact to float32 rounding for any shape, the
same numbers for a row whatever its batch or the thread count, and refusals that say what it needs."""

from __future__ import annotations

import pytest
import torch

from openelm_server.model import float32_cpu
from openelm_server.model.cpu_linear import PanelLinear

kernel = float32_cpu.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="our float32 CPU kernel does not build here (see the log)")


def operands(rows: int, out_features: int, in_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_features, generator=generator), torch.randn(
        out_features, in_features, generator=generator
    )


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 12, 13, 17])  # row blocks of 6 and every tail
@pytest.mark.parametrize(
    "out_features, in_features",
    [(16, 8), (37, 24), (96, 300), (5, 520)],  # a partial last panel; inputs over two blocks of 256, and a tail
)
def test_products_equal_float64_to_float32_rounding(rows, out_features, in_features):
    x, weight = operands(rows, out_features, in_features)
    want = x.double() @ weight.double().T
    got = kernel(x, float32_cpu.pack(weight), out_features)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    size = x.double().norm(dim=1, keepdim=True) * weight.double().norm(dim=1)
    assert float(((got.double() - want).abs() / size).max()) < 1e-6


@needs_kernel
def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads():
    x, weight = operands(19, 53, 600, seed=1)
    packed = float32_cpu.pack(weight)
    together = kernel(x, packed, 53)
    for row in range(19):
        assert torch.equal(kernel(x[row : row + 1], packed, 53), together[row : row + 1])
    for start, stop in ((0, 6), (3, 5), (2, 19), (1, 14)):
        assert torch.equal(kernel(x[start:stop].contiguous(), packed, 53), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel(x, packed, 53), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_no_rows_give_no_rows():
    _, weight = operands(1, 20, 32)
    assert kernel(torch.empty(0, 32), float32_cpu.pack(weight), 20).shape == (0, 20)


@needs_kernel
def test_operands_it_cannot_take_are_refused_with_what_it_needs():
    x, weight = operands(2, 32, 64)
    packed = float32_cpu.pack(weight)
    with pytest.raises(RuntimeError, match=r"x: float32 \[rows, in\], contiguous"):
        kernel(x.to(torch.bfloat16), packed, 32)
    with pytest.raises(RuntimeError, match=r"x: float32 \[rows, in\], contiguous"):
        kernel(x.T.contiguous().T, packed, 32)
    with pytest.raises(RuntimeError, match=r"packed: float32 \[panels, in, 16\]"):
        kernel(x, weight, 32)
    with pytest.raises(RuntimeError, match=r"shapes: x \[rows, in\], packed \[ceil\(out / 16\), in, 16\]"):
        kernel(x, packed, 48)
    with pytest.raises(RuntimeError, match=r"shapes"):
        kernel(x[:, :60].contiguous(), packed, 32)


@pytest.mark.parametrize("out_features", [16, 37, 3])
def test_packing_keeps_every_weight_and_unpacks_to_the_plain_layout(out_features):
    _, weight = operands(1, out_features, 40)
    packed = float32_cpu.pack(weight)
    panels = -(-out_features // 16)
    assert packed.shape == (panels, 40, 16) and packed.is_contiguous()
    assert torch.equal(float32_cpu.unpack(packed, out_features), weight)
    # Panel 0, input k: the weights of outputs 0..15 for input k, side by side.
    assert torch.equal(packed[0, 5, : min(16, out_features)], weight[:16, 5])
    assert not packed[-1, :, out_features - 16 * (panels - 1) :].any()  # the last panel's padding is zero


@needs_kernel
def test_the_layer_keeps_leading_dimensions_and_equals_f_linear():
    x, weight = operands(6, 45, 72, seed=2)
    layer = PanelLinear(weight)
    batched = x.view(2, 3, 72)
    got = layer(batched)
    assert got.shape == (2, 3, 45)
    assert torch.allclose(got, torch.nn.functional.linear(batched, weight), atol=1e-5)
    assert torch.equal(layer.plain_weight(), weight)

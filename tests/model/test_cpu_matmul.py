"""Our CPU matmul kernels (cpu_matmul.py), float32, bfloat16 and int8 weights: products exact to float32
rounding for any shape, the same numbers for a row whatever its batch or the thread count, the
panel layout, and refusals that say what the kernel needs."""

from __future__ import annotations

import pytest
import torch

from openelm_server.model import cpu_extension, cpu_matmul
from openelm_server.model.cpu_linear import PanelLinear

pytestmark = pytest.mark.skipif(
    not cpu_extension.available(), reason="our CPU matmul kernels do not build here (see the log)"
)


def operands(weights: str, rows: int, out_features: int, in_features: int, seed: int = 0):
    """x, the weight as the kernel takes it, its scales (None for float32), and the float64 weight."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    if weights in ("float32", "bfloat16"):
        weight = torch.randn(out_features, in_features, generator=generator).to(getattr(torch, weights))
        return x, weight, None, weight.double()
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) + 0.01
    return x, weight, scales, weight.double() * scales.double()[:, None]


def product(x, packed, scales, out_features):
    if packed.dtype == torch.bfloat16:
        return cpu_matmul.bfloat16_matmul(x, packed, out_features)
    if scales is None:
        return cpu_matmul.float32_matmul(x, packed, out_features)
    return cpu_matmul.int8_matmul(x, packed, scales, out_features)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 12, 13, 17])  # narrow steps, row blocks of 6 and every tail
@pytest.mark.parametrize(
    "out_features, in_features",
    # one panel, a partial last one; panels taken 2 or 3 at a time (one row: 3) with 1 or 2 left
    # over; inputs over blocks of 256 with a tail
    [(16, 8), (37, 24), (80, 300), (112, 40), (5, 520)],
)
def test_products_equal_float64_to_float32_rounding(weights, rows, out_features, in_features):
    x, weight, scales, exact = operands(weights, rows, out_features, in_features)
    want = x.double() @ exact.T
    got = product(x, cpu_matmul.pack(weight), scales, out_features)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    size = x.double().norm(dim=1, keepdim=True) * exact.norm(dim=1)
    assert float(((got.double() - want).abs() / size).max()) < 1e-6


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads(weights):
    x, weight, scales, _ = operands(weights, 19, 53, 600, seed=1)
    packed = cpu_matmul.pack(weight)
    together = product(x, packed, scales, 53)
    for row in range(19):
        assert torch.equal(product(x[row : row + 1], packed, scales, 53), together[row : row + 1])
    for start, stop in ((0, 2), (0, 6), (3, 5), (2, 19), (1, 14)):
        assert torch.equal(product(x[start:stop].contiguous(), packed, scales, 53), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(product(x, packed, scales, 53), together)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_leading_dimensions_stay_and_any_layout_of_x_is_taken(weights):
    x, weight, scales, _ = operands(weights, 6, 40, 72, seed=3)
    packed = cpu_matmul.pack(weight)
    flat = product(x, packed, scales, 40)
    assert torch.equal(product(x.view(2, 3, 72), packed, scales, 40), flat.view(2, 3, 40))
    assert torch.equal(product(x.T.contiguous().T, packed, scales, 40), flat)  # column-major: copied first


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_no_rows_give_no_rows(weights):
    _, weight, scales, _ = operands(weights, 1, 20, 32)
    assert product(torch.empty(0, 32), cpu_matmul.pack(weight), scales, 20).shape == (0, 20)


def test_operands_they_cannot_take_are_refused_with_what_they_need():
    x, weight, _, _ = operands("float32", 2, 32, 64)
    packed = cpu_matmul.pack(weight)
    with pytest.raises(RuntimeError, match=r"x: float32 \[..., in\]"):
        cpu_matmul.float32_matmul(x.to(torch.bfloat16), packed, 32)
    with pytest.raises(RuntimeError, match=r"packed: \[panels, in, 16\], contiguous"):
        cpu_matmul.float32_matmul(x, weight, 32)
    with pytest.raises(RuntimeError, match=r"shapes: x \[..., in\], packed \[ceil\(out / 16\), in, 16\]"):
        cpu_matmul.float32_matmul(x, packed, 48)
    with pytest.raises(RuntimeError, match=r"shapes"):
        cpu_matmul.float32_matmul(x[:, :60].contiguous(), packed, 32)
    with pytest.raises(RuntimeError, match=r"packed: float32 weights"):
        cpu_matmul.float32_matmul(x, packed.to(torch.int8), 32)
    with pytest.raises(RuntimeError, match=r"packed: bfloat16 weights"):
        cpu_matmul.bfloat16_matmul(x, packed, 32)
    with pytest.raises(RuntimeError, match=r"packed: int8 weights"):
        cpu_matmul.int8_matmul(x, packed, torch.ones(32), 32)
    with pytest.raises(RuntimeError, match=r"scales: float32 \[out\], contiguous"):
        cpu_matmul.int8_matmul(x, packed.to(torch.int8), torch.ones(31), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("out_features", [16, 37, 3])
def test_packing_keeps_every_weight_and_unpacks_to_the_plain_layout(dtype, out_features):
    weight = torch.arange(out_features * 40).view(out_features, 40).remainder(251).sub(125).to(dtype)
    packed = cpu_matmul.pack(weight)
    panels = -(-out_features // 16)
    assert packed.shape == (panels, 40, 16) and packed.dtype == dtype and packed.is_contiguous()
    unpacked = cpu_matmul.unpack(packed, out_features)
    assert torch.equal(unpacked, weight) and unpacked.is_contiguous()
    # Panel 0, input k: the weights of outputs 0..15 for input k, side by side.
    assert torch.equal(packed[0, 5, : min(16, out_features)], weight[:16, 5])
    assert not packed[-1, :, out_features - 16 * (panels - 1) :].any()  # the last panel's padding is zero


def test_the_float32_layer_keeps_leading_dimensions_and_equals_f_linear():
    x, weight, _, _ = operands("float32", 6, 45, 72, seed=2)
    layer = PanelLinear(weight)
    batched = x.view(2, 3, 72)
    got = layer(batched)
    assert got.shape == (2, 3, 45)
    assert torch.allclose(got, torch.nn.functional.linear(batched, weight), atol=1e-5)
    assert torch.equal(layer.plain_weight(), weight)

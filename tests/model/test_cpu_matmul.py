"""Our CPU matmul kernels (cpu_matmul.py), float32, bfloat16 and int8 weights, built for AVX2 and (where
the CPU has it) AVX-512: products exact to float32 rounding for any shape, the same numbers for a
row whatever its batch, the thread count or the instruction set, the panel layout, and refusals that
say what the kernel needs."""

from __future__ import annotations

import pytest
import torch

from openelm_server.model import cpu_extension, cpu_matmul
from openelm_server.model.cpu_linear import PanelLinear

pytestmark = pytest.mark.skipif(
    not cpu_extension.available(), reason="our CPU matmul kernels do not build here (see the log)"
)
ISAS = list(cpu_extension.matmul_isas()) or ["AVX2"]  # where none builds, every test here is skipped


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


def product(x, packed, scales, out_features, isa="AVX2"):
    if packed.dtype == torch.bfloat16:
        return cpu_matmul.bfloat16_matmul(x, packed, out_features, isa)
    if scales is None:
        return cpu_matmul.float32_matmul(x, packed, out_features, isa)
    return cpu_matmul.int8_matmul(x, packed, scales, out_features, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
# narrow steps, row blocks of 6 (AVX2) and 8 (AVX-512) and every tail
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 17])
@pytest.mark.parametrize(
    "out_features, in_features",
    # one panel, a partial last one; panels taken 2, 3 or 4 at a time with 1 to 3 left over;
    # inputs over blocks of 128 (AVX-512) and 256 (AVX2) with a tail
    [(16, 8), (37, 24), (80, 300), (112, 40), (5, 520), (96, 136)],
)
def test_products_equal_float64_to_float32_rounding(isa, weights, rows, out_features, in_features):
    x, weight, scales, exact = operands(weights, rows, out_features, in_features)
    want = x.double() @ exact.T
    got = product(x, cpu_matmul.pack(weight), scales, out_features, isa)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    size = x.double().norm(dim=1, keepdim=True) * exact.norm(dim=1)
    assert float(((got.double() - want).abs() / size).max()) < 1e-6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads(isa, weights):
    x, weight, scales, _ = operands(weights, 19, 53, 600, seed=1)
    packed = cpu_matmul.pack(weight)
    together = product(x, packed, scales, 53, isa)
    for row in range(19):
        assert torch.equal(product(x[row : row + 1], packed, scales, 53, isa), together[row : row + 1])
    for start, stop in ((0, 2), (0, 6), (3, 5), (2, 19), (1, 14), (0, 8), (5, 16)):
        assert torch.equal(product(x[start:stop].contiguous(), packed, scales, 53, isa), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(product(x, packed, scales, 53, isa), together)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(len(ISAS) < 2, reason="our matmul is built for AVX2 only here (no AVX-512 in PyTorch's CPU)")
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_both_instruction_sets_give_the_same_numbers_bit_for_bit(weights):
    # Why start-up may pick either by timing: the choice changes speed, never an answer.
    for rows, out_features, in_features in ((1, 200, 700), (2, 64, 256), (16, 1280, 1280), (29, 117, 300)):
        x, weight, scales, _ = operands(weights, rows, out_features, in_features, seed=rows)
        packed = cpu_matmul.pack(weight)
        assert torch.equal(
            product(x, packed, scales, out_features, "AVX2"), product(x, packed, scales, out_features, "AVX-512")
        )


def test_the_chosen_instruction_set_is_one_that_is_built_here():
    assert cpu_extension.matmul_isa() in cpu_extension.matmul_isas()


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


@pytest.mark.parametrize("isa", ISAS)
def test_operands_they_cannot_take_are_refused_with_what_they_need(isa):
    x, weight, _, _ = operands("float32", 2, 32, 64)
    packed = cpu_matmul.pack(weight)
    with pytest.raises(RuntimeError, match=r"x: float32 \[..., in\]"):
        cpu_matmul.float32_matmul(x.to(torch.bfloat16), packed, 32, isa)
    with pytest.raises(RuntimeError, match=r"packed: \[panels, in, 16\], contiguous"):
        cpu_matmul.float32_matmul(x, weight, 32, isa)
    with pytest.raises(RuntimeError, match=r"shapes: x \[..., in\], packed \[ceil\(out / 16\), in, 16\]"):
        cpu_matmul.float32_matmul(x, packed, 48, isa)
    with pytest.raises(RuntimeError, match=r"shapes"):
        cpu_matmul.float32_matmul(x[:, :60].contiguous(), packed, 32, isa)
    with pytest.raises(RuntimeError, match=r"packed: float32 weights"):
        cpu_matmul.float32_matmul(x, packed.to(torch.int8), 32, isa)
    with pytest.raises(RuntimeError, match=r"packed: bfloat16 weights"):
        cpu_matmul.bfloat16_matmul(x, packed, 32, isa)
    with pytest.raises(RuntimeError, match=r"packed: int8 weights"):
        cpu_matmul.int8_matmul(x, packed, torch.ones(32), 32, isa)
    with pytest.raises(RuntimeError, match=r"scales: float32 \[out\], contiguous"):
        cpu_matmul.int8_matmul(x, packed.to(torch.int8), torch.ones(31), 32, isa)


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

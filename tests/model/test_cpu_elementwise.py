"""Our CPU element-wise chains (cpu_elementwise.py) against PyTorch's ops: RMSNorm, the per-head
norm with the rotary embedding, SwiGLU; their edge cases; and that the model's functions call
them for float32 on the CPU and PyTorch's ops for anything else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openelm_server.model import cpu_elementwise, cpu_extension
from openelm_server.model import openelm as model_module

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="our CPU kernels do not build here (see the log)")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1280), (7, 64), (3, 2, 13), (5, 8)])  # dims with and without a tail past 8
def test_rms_norm_equals_pytorchs(shape):
    x = torch.randn(shape, generator=generator()) * 3
    weight = torch.randn(shape[-1], generator=generator(1))
    got = cpu_elementwise.rms_norm(x, weight, 1e-6)
    want = F.rms_norm(x, (shape[-1],), weight, 1e-6)
    assert got.shape == x.shape and got.is_contiguous()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rms_norm_of_zeros_is_zeros_and_a_row_does_not_depend_on_its_batch():
    x = torch.randn(9, 96, generator=generator())
    x[4] = 0
    weight = torch.rand(96, generator=generator(1))
    together = cpu_elementwise.rms_norm(x, weight, 1e-5)
    assert torch.equal(together[4], torch.zeros(96))
    for row in range(9):
        assert torch.equal(cpu_elementwise.rms_norm(x[row : row + 1], weight, 1e-5), together[row : row + 1])


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@pytest.mark.parametrize("tokens, query_heads, kv_heads, dim", [(1, 12, 3, 64), (5, 4, 2, 16), (3, 6, 6, 10)])
def test_norm_and_rotate_equals_pytorchs(tokens, query_heads, kv_heads, dim):
    # As the model hands them over: queries and keys a view of the projection (values after them),
    # the weights one row expanded per head.
    projection = torch.randn(tokens, query_heads + 2 * kv_heads, dim, generator=generator())
    qk = projection[:, : query_heads + kv_heads]
    query_weight = torch.randn(dim, generator=generator(1)).expand(query_heads, -1)
    key_weight = torch.randn(dim, generator=generator(2)).expand(kv_heads, -1)
    angles = torch.rand(tokens, 1, dim, generator=generator(3)) * 6
    cos, sin = angles.cos(), angles.sin()
    got = cpu_elementwise.norm_and_rotate(qk, query_weight, key_weight, 1e-6, cos, sin)
    normed = F.rms_norm(qk, (dim,), None, 1e-6) * torch.cat((query_weight, key_weight))
    want = normed * cos + rotate_half(normed) * sin
    assert got.shape == qk.shape and got.is_contiguous()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_silu_and_mul_equals_pytorchs_from_large_negative_to_large_positive():
    gate = torch.cat((torch.tensor([-200.0, -88.0, -20.0, -1e-8, 0.0, -0.0, 1e-8, 20.0, 88.0, 200.0]), torch.randn(45)))
    up = torch.randn(55, generator=generator(1))
    gate_up = torch.cat((gate, up)).view(1, 110).repeat(3, 1)
    got = cpu_elementwise.silu_and_mul(gate_up)
    want = F.silu(gate) * up
    assert got.shape == (3, 55)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[0], got[2])


def test_refusals_say_what_is_needed():
    with pytest.raises(RuntimeError, match=r"x: float32 \[..., dim\]"):
        cpu_elementwise.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight: float32 \[dim\]"):
        cpu_elementwise.rms_norm(torch.ones(2, 8), torch.ones(9), 1e-6)
    with pytest.raises(RuntimeError, match=r"gate_up: float32 \[..., 2 \* hidden\]"):
        cpu_elementwise.silu_and_mul(torch.ones(2, 7))
    with pytest.raises(RuntimeError, match="heads adding up to qk's"):
        qk = torch.ones(1, 5, 8)
        cpu_elementwise.norm_and_rotate(
            qk, torch.ones(4, 8), torch.ones(2, 8), 1e-6, torch.ones(1, 1, 8), torch.ones(1, 1, 8)
        )


@pytest.mark.parametrize("dtype, ours", [(torch.float32, True), (torch.bfloat16, False)])
def test_the_models_chains_use_ours_for_float32_on_the_cpu(monkeypatch, dtype, ours):
    calls = []
    for name in ("rms_norm", "norm_and_rotate", "silu_and_mul"):
        real = getattr(cpu_elementwise, name)
        monkeypatch.setattr(
            cpu_elementwise, name, lambda *args, real=real, name=name: calls.append(name) or real(*args)
        )
    x = torch.randn(2, 16).to(dtype)
    weight = torch.ones(16, dtype=dtype)
    model_module.rms_norm(x, weight, 1e-6)
    model_module.silu_and_mul(x)
    qk = torch.randn(2, 3, 8).to(dtype)
    angles = torch.zeros(2, 1, 8)
    model_module.norm_and_rotate(
        qk, weight[:8].expand(2, -1), weight[:8].expand(1, -1), 1e-6, angles.cos(), angles.sin()
    )
    assert calls == (["rms_norm", "silu_and_mul", "norm_and_rotate"] if ours else [])

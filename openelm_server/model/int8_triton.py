"""The int8 weight-only matmul on CUDA, as a Triton kernel: ``y = (x @ int8.T) * scales``.

A decode step reads every weight once, so int8 weights halve the bytes a bfloat16 step reads.
PyTorch's own CUDA kernel for the product (``aten._weight_int8pack_mm``) computes each output
without tensor cores: on an H200 it took 0.67 ms for one row of a 24576 x 3072 layer where the
bfloat16 matmul took 0.05 ms, and it grows with every row (43 ms for 256). This kernel reads each
int8 weight once per block of rows, converts it in registers and multiplies on the tensor cores
(``tl.dot``) into a float32 sum; the per-channel scale is applied once at the end. Measured on an
H200 (bench/cuda_check.py, BENCHMARKS.md): 0.06 ms for 1 to 8 rows of that layer, 0.19 ms for 64,
so a decode step runs at about bfloat16's speed, not yet faster; a narrow, deep layer (3072 x
12288, the FFN's down projection) takes 0.10 ms against bfloat16's 0.04, each block of columns
walking all 12288 inputs alone.

Invariants:

- ``x`` is [rows, in_features], contiguous, float32 or bfloat16; ``weight`` int8 [out, in],
  contiguous; ``scales`` float32 [out]; ``y`` [rows, out] in x's dtype.
- The product is taken in TF32 for bfloat16 activations (which holds every bfloat16 and int8
  value exactly, so nothing is lost against a bfloat16 product) and in IEEE float32 for float32
  activations, as the server's float32 matmuls are (no TF32).
- The cut (:class:`KernelConfig`) is chosen from the shape alone (no autotuning): OpenELM's
  layers differ in width layer by layer, and timing every shape at start-up would cost more than
  it wins. Enough blocks of output columns are made to occupy every multiprocessor on layers as
  narrow as 3072 columns. With ``split_k`` > 1 each block of columns is also split along the
  inputs, the parts adding their scaled sums into a float32 output (zeroed first) that is then
  cast: more blocks for narrow, deep layers, at two more kernels per call.
- The launch is plain: it replays inside CUDA graphs once compiled (the first call per shape
  compiles, which the graph warm-up does outside capture).

Triton is imported here only, so machines without it (the CPU wheel) never load this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelConfig:
    """How one call is cut: output tiles of ``block_m`` rows x ``block_n`` columns, stepping
    ``block_k`` inputs at a time, the inputs split ``split_k`` ways (partial sums added atomically
    into a float32 output), and Triton's ``num_warps`` / ``num_stages``."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _int8_weight_matmul_kernel(
    x_ptr,
    weight_ptr,
    scales_ptr,
    y_ptr,
    rows,
    out_features,
    in_features,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block_n = tl.program_id(0)
    block_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_in = offs_m[:, None] < rows
    column_in = offs_n[None, :] < out_features
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, in_features)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):
        k = start + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * in_features + k[None, :], mask=row_in & (k[None, :] < k_end), other=0.0)
        w = tl.load(
            weight_ptr + offs_n[None, :] * in_features + k[:, None],
            mask=column_in & (k[:, None] < k_end),
            other=0,
        )
        # Both in float32: TF32 holds every bfloat16 and int8 value exactly, so a bfloat16 input
        # loses nothing, and float32 inputs take the IEEE path.
        total += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
    scales = tl.load(scales_ptr + offs_n, mask=offs_n < out_features, other=0.0)
    y = total * scales[None, :]
    outputs = y_ptr + offs_m[:, None] * out_features + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(outputs, y.to(y_ptr.dtype.element_ty), mask=row_in & column_in)
    else:
        tl.atomic_add(outputs, y, mask=row_in & column_in)


def config_for(rows: int, out_features: int, in_features: int) -> KernelConfig:
    """The cut used unless one is given: rows padded to a power of two from 16 (tl.dot's least),
    up to 64 per block; column blocks of 16 for narrow layers so that 3072 columns still make 192
    blocks, wider ones for wide layers; no split of the inputs. (The blocks measured on an H200;
    bench/cuda_check.py times other cuts beside it.)"""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 16 if out_features <= 4096 else 32 if out_features <= 16384 else 64
    block_k = 256 if block_m <= 16 else 128
    return KernelConfig(block_m, block_n, block_k)


def int8_weight_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, config: KernelConfig | None = None
) -> torch.Tensor:
    """``x`` [rows, in] times the int8 ``weight`` [out, in] transposed, times ``scales`` [out]."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    config = config or config_for(rows, out_features, in_features)
    steps = triton.cdiv(in_features, config.block_k)
    k_per_split = triton.cdiv(steps, config.split_k) * config.block_k
    split_k = triton.cdiv(in_features, k_per_split)  # no split left without inputs
    if split_k == 1:
        y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(rows, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, config.block_n), triton.cdiv(rows, config.block_m), split_k)
    _int8_weight_matmul_kernel[grid](
        x,
        weight,
        scales,
        y,
        rows,
        out_features,
        in_features,
        k_per_split,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y if split_k == 1 else y.to(x.dtype)

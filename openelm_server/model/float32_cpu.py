"""The float32 matmul of linear layers on x86 CPUs with AVX2: our own kernel, compiled on first use.

oneDNN's inner product, the faster of PyTorch's two float32 paths on the AMD EPYC we develop on,
reads the weights of a one-stream decode step at 17-23 GB/s where the memory gives 26-33, and
reaches 60-75 GFLOP/s for 16 rows where the cores give 117-145 (bench/cpu_linears.py). This
kernel holds each weight in panels of 16 outputs and multiplies a panel into 6 activation rows at
a time from registers (12 accumulators: the classic AVX2 register block), every block of 256
inputs of a panel staying in the L1 cache while all row groups pass over it. On OpenELM-270M's
layers there: 24-25 GB/s for one row, 92 GFLOP/s for 16, 120 for 64, ahead of oneDNN at every
row count from 1 to 256.

Invariants:

- ``x`` [rows, in_features] float32 contiguous; ``packed`` float32 [panels, in_features, 16] as
  :func:`pack` makes it (panel p, input k holds the weights of outputs 16p..16p+15 for input k;
  outputs past ``out_features`` in the last panel are zero); out: float32 [rows, out_features].
- Every output is summed over its inputs in order, in one accumulator, whatever the number of
  rows or threads (the lanes of a vector are 16 outputs, never parts of one sum; a block of inputs
  hands its partial sums to the next through memory, exactly): a row's numbers do not depend on
  its batch, nor on the thread count.
- Built as cpu_extension.py says. Where that fails, :func:`load` returns None and the server
  keeps oneDNN's or PyTorch's kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from openelm_server.model import cpu_extension

PANEL = 16  # outputs per panel: two AVX2 vectors

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t PANEL = 16;
constexpr int64_t DEPTH = 256;  // inputs per block: a panel's block is 16 KB, in L1 for every row group
constexpr int ROW_BLOCK = 6;    // 6 rows x 2 vectors = 12 accumulators, 2 weight vectors, 1 broadcast

// y[r][0..15] (+)= x[r][k0..k1) . panel[k0..k1)[0..15] for R rows; starts from y after the first block.
template <int R>
inline void tile(const float* x, int64_t in, const float* panel, float* y, int64_t ldy, int64_t k0, int64_t k1) {
  __m256 lo[R], hi[R];
  const bool resume = k0 != 0;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    lo[r] = resume ? _mm256_loadu_ps(y + r * ldy) : _mm256_setzero_ps();
    hi[r] = resume ? _mm256_loadu_ps(y + r * ldy + 8) : _mm256_setzero_ps();
  }
  const float* xk = x + k0;
  const float* wk = panel + k0 * PANEL;
  for (int64_t k = k0; k < k1; ++k, ++xk, wk += PANEL) {
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(xk + r * in);
      lo[r] = _mm256_fmadd_ps(w0, b, lo[r]);
      hi[r] = _mm256_fmadd_ps(w1, b, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, lo[r]);
    _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
  }
}

inline void row_block(int64_t rows, const float* x, int64_t in, const float* panel, float* y, int64_t ldy,
                      int64_t k0, int64_t k1) {
  switch (rows) {
    case 6: tile<6>(x, in, panel, y, ldy, k0, k1); break;
    case 5: tile<5>(x, in, panel, y, ldy, k0, k1); break;
    case 4: tile<4>(x, in, panel, y, ldy, k0, k1); break;
    case 3: tile<3>(x, in, panel, y, ldy, k0, k1); break;
    case 2: tile<2>(x, in, panel, y, ldy, k0, k1); break;
    default: tile<1>(x, in, panel, y, ldy, k0, k1); break;
  }
}

// All rows times one panel, block of inputs by block, every row group over a block while it is in L1.
inline void panel_product(const float* x, int64_t rows, int64_t in, const float* panel, float* y, int64_t ldy) {
  for (int64_t k0 = 0; k0 < in; k0 += DEPTH) {
    const int64_t k1 = std::min(in, k0 + DEPTH);
    for (int64_t r = 0; r < rows; r += ROW_BLOCK)
      row_block(std::min<int64_t>(ROW_BLOCK, rows - r), x + r * in, in, panel, y + r * ldy, ldy, k0, k1);
  }
}

at::Tensor float32_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [rows, in], contiguous");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.size(2) == PANEL, "packed: float32 [panels, in, 16], contiguous");
  const int64_t rows = x.size(0), in = x.size(1), panels = packed.size(0), full = out / PANEL;
  TORCH_CHECK(packed.size(1) == in && panels == (out + PANEL - 1) / PANEL,
              "shapes: x [rows, in], packed [ceil(out / 16), in, 16]");
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = wp + p * in * PANEL;
      if (p < full) {
        panel_product(xp, rows, in, panel, yp + p * PANEL, out);
        continue;
      }
      std::vector<float> last(rows * PANEL);  // the last panel is partly padding: only its real outputs go to y
      panel_product(xp, rows, in, panel, last.data(), PANEL);
      const int64_t real = out - full * PANEL;
      for (int64_t r = 0; r < rows; ++r)
        std::copy(last.begin() + r * PANEL, last.begin() + r * PANEL + real, yp + r * out + full * PANEL);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(openelm_float32_cpu, m) { m.def("float32_matmul(Tensor x, Tensor packed, int out) -> Tensor"); }
TORCH_LIBRARY_IMPL(openelm_float32_cpu, CPU, m) { m.impl("float32_matmul", &float32_matmul); }
"""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` float32 [out, in] in the kernel's layout [ceil(out / 16), in, 16], as a fresh tensor."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = torch.zeros(panels * PANEL, in_features, dtype=weight.dtype)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain [out, in] weight of a packed one, as a fresh tensor."""
    panels, in_features, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, in_features)[:out_features].clone()


@functools.cache
def load() -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """The kernel, ``(x, packed, out_features) -> y``, built on first call; None where it cannot
    run here (logged once, with the reason)."""
    if not cpu_extension.build(
        "openelm_float32_cpu", _SOURCE, "float32 linear layers choose between oneDNN's and PyTorch's kernels"
    ):
        return None
    return torch.ops.openelm_float32_cpu.float32_matmul

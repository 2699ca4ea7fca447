"""The int8 matmul on x86 CPUs with AVX2: our own kernel, compiled on first use.

PyTorch's CPU int8 weight-only matmul (``aten._weight_int8pack_mm``) reads int8 weights at under
10 GB/s on a 2-core AMD EPYC (a third of the memory's bandwidth) and recomputes each weight's
conversion for every row, so that int8 decoding was only twice as fast as float32 with a quarter
of its bytes, and slower than float32 from 16 rows on. This kernel converts a block of 4 weight
rows once per 8 inputs and multiplies it into up to 4 activation rows at a time, in float32, and
reads the weights in one stream (the layout below): on 40 cold 7680 x 1280 layers there, 2x
PyTorch's speed for one row and 1.9x for 16, with no bfloat16 rounding of the activations.

Invariants:

- ``x`` [rows, in_features] float32 contiguous, ``weight`` int8 [out_features, in_features]
  contiguous in the layout :func:`pack` makes, ``scales`` float32 [out_features];
  ``in_features`` a multiple of 8 (quantize.py asks 16 of every int8 layer). Out: float32
  [rows, out_features].
- The packed layout: each block of 4 weight rows holds, for every 8 inputs in turn, those 8
  weights of row 0, of row 1, row 2, row 3 (32 bytes); rows past the last full block stay as
  they are. The kernel then reads each block front to back: reading the 4 rows side by side
  from their own places reached 14 GB/s where the memory gives 30, packed 20.
- Every output is one row's dot product with one weight row, summed in the same order (8 lanes
  over the inputs, then the lanes) whatever the number of rows or threads: a row's numbers do
  not depend on its batch.
- Built as cpu_extension.py says, the first time a process asks for it. Where that fails,
  :func:`load` returns None and int8 layers keep PyTorch's kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from openelm_server.model import cpu_extension

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

inline float lane_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

inline __m256 load_int8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ROWS activation rows times FEATURES weight rows: each weight vector is converted once and
// used for every activation row; each output keeps its own accumulator. A block of 4 rows is
// packed (weight (f, k) at k * 4 + f * 8); a single row is plain.
template <int ROWS, int FEATURES>
inline void tile(const float* x, const int8_t* w, const float* scales, float* y, int64_t in, int64_t out) {
  __m256 acc[ROWS][FEATURES];
  for (int r = 0; r < ROWS; ++r)
    for (int f = 0; f < FEATURES; ++f) acc[r][f] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; k += 8) {
    __m256 weights[FEATURES];
    for (int f = 0; f < FEATURES; ++f) weights[f] = load_int8(w + k * FEATURES + f * 8);
    for (int r = 0; r < ROWS; ++r) {
      __m256 inputs = _mm256_loadu_ps(x + r * in + k);
      for (int f = 0; f < FEATURES; ++f) acc[r][f] = _mm256_fmadd_ps(weights[f], inputs, acc[r][f]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int f = 0; f < FEATURES; ++f) y[r * out + f] = lane_sum(acc[r][f]) * scales[f];
}

template <int FEATURES>
inline void feature_block(const float* x, const int8_t* w, const float* s, float* y, int64_t rows, int64_t in,
                          int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile<4, FEATURES>(x + r * in, w, s, y + r * out, in, out);
  for (; r + 2 <= rows; r += 2) tile<2, FEATURES>(x + r * in, w, s, y + r * out, in, out);
  for (; r < rows; ++r) tile<1, FEATURES>(x + r * in, w, s, y + r * out, in, out);
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [rows, in], contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: int8 [out, in], contiguous");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales: float32 [out]");
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  TORCH_CHECK(weight.size(1) == in && scales.size(0) == out && in % 8 == 0,
              "shapes: x [rows, in], weight [out, in], scales [out], in % 8 == 0");
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = out / 4;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) feature_block<4>(xp, wp + 4 * b * in, sp + 4 * b, yp + 4 * b, rows, in, out);
  });
  for (int64_t f = 4 * blocks; f < out; ++f) feature_block<1>(xp, wp + f * in, sp + f, yp + f, rows, in, out);
  return y;
}

}  // namespace

TORCH_LIBRARY(openelm_int8_cpu, m) { m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(openelm_int8_cpu, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
"""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] int8 in the kernel's layout (see above), as a fresh tensor."""
    out_features, in_features = weight.shape
    full = out_features // 4 * 4
    packed = weight.clone()
    blocks = weight[:full].view(full // 4, 4, in_features // 8, 8)
    packed[:full] = blocks.permute(0, 2, 1, 3).reshape(full, in_features)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The plain [out, in] weight of a packed one, as a fresh tensor."""
    out_features, in_features = packed.shape
    full = out_features // 4 * 4
    weight = packed.clone()
    blocks = packed[:full].view(full // 4, in_features // 8, 4, 8)
    weight[:full] = blocks.permute(0, 2, 1, 3).reshape(full, in_features)
    return weight


@functools.cache
def load() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The kernel, ``(x, weight, scales) -> y``, built on first call; None where it cannot run
    here (logged once, with the reason)."""
    if not cpu_extension.build("openelm_int8_cpu", _SOURCE, "int8 layers use PyTorch's CPU kernel"):
        return None
    return torch.ops.openelm_int8_cpu.int8_matmul

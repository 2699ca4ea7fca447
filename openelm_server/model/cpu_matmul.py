"""Our matmul kernels for the CPU's linear layers: float32, bfloat16 or int8 weights, float32 sums, AVX2.

The weights are held in panels of 16 outputs (for each input in turn, the 16 outputs' weights side
by side) and multiplied into 6 activation rows at a time from 12 AVX2 accumulators (the classic
register block), every block of 256 inputs of a panel staying in L1 while all row groups pass over
it; bfloat16 and int8 weights are widened to float32 as they are read (int8's per-output scales
applied at the end): the memory traffic of their size, the arithmetic of float32. One row takes
three panels at once, two rows two, so that more sums are in flight.

Why our own: on the 2-core AMD EPYC we develop on, oneDNN (PyTorch's faster float32 path there)
reads a one-stream decode step's weights at 17-23 GB/s of the 26-33 the memory gives and reaches
60-75 GFLOP/s for 16 rows of a 117-145 peak; PyTorch's int8 weight-only kernel
(``aten._weight_int8pack_mm``) reads under 10 GB/s and reaches ~50 GFLOP/s. On OpenELM-270M's
layers (``python -m bench.cpu_linears``) ours gives, float32: 22-28 GB/s for one row, 84-97
GFLOP/s for 16, 113-123 for 64; bfloat16: 23-24 GB/s for one row (1.75x float32's speed),
107-110 GFLOP/s for 16; int8: 16-21 GB/s for one row with two panels at once, 19-25 with three,
109-126 GFLOP/s for 16.

Invariants:

- ``x`` [..., in] float32 (made contiguous); ``packed`` [ceil(out / 16), in, 16] as :func:`pack`
  makes it, float32, bfloat16 or int8, outputs past ``out`` in the last panel zero; ``scales`` (int8)
  float32 [out]. Out: float32 [..., out]: a layer is one call.
- Every output is summed over its inputs in order, in one float32 accumulator (the lanes of a
  vector are 16 outputs, never parts of one sum; a block of inputs hands its partial sums to the
  next through memory, exactly), whatever the number of rows or threads: a row's numbers do not
  depend on its batch, nor on the thread count.
- Built with our other CPU kernels into one extension (cpu_extension.py); where that cannot be,
  the layers keep oneDNN's or PyTorch's kernels.
"""

from __future__ import annotations

import torch

PANEL = 16  # outputs per panel: two AVX2 vectors of float32

SOURCE = r"""
namespace openelm_matmul {

constexpr int64_t PANEL = 16;
constexpr int64_t DEPTH = 256;    // inputs per block: a float32 panel's block is 16 KB, in L1 for every row group
constexpr int ROW_BLOCK = 6;      // 6 rows x 2 vectors = 12 accumulators, 2 weight vectors, 1 broadcast
// Where one or two rows leave the FMA units waiting on few chains of sums, adjacent panels share
// each row's broadcast: one row takes 3 (6 accumulators, 6 weight vectors: int8 weights read
// ~20% faster than with 2 on a 2-core EPYC; 4 would need 17 of the 16 registers), two rows take 2
// (8 accumulators, 4 weight vectors).
constexpr int ONE_ROW_PANELS = 3;
constexpr int TWO_ROW_PANELS = 2;
inline int64_t panels_at_once(int64_t rows) { return rows == 1 ? ONE_ROW_PANELS : TWO_ROW_PANELS; }

inline void load_weights(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}
inline void load_weights(const at::BFloat16* w, __m256& lo, __m256& hi) {  // a bfloat16 is a float's top half
  const __m128i* p = reinterpret_cast<const __m128i*>(w);
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p + 1)), 16));
}
inline void load_weights(const int8_t* w, __m256& lo, __m256& hi) {
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))));
}

// R rows x P panels over inputs [k0, k1): y (+)= x . panel, starting from y after the first block;
// after the last block, times the scales (int8 weights).
template <typename W, int R, int P>
inline void tile(const float* x, int64_t in, const W* panel, const float* scales, float* y, int64_t ldy,
                 int64_t k0, int64_t k1) {
  __m256 lo[P][R], hi[P][R];
  const bool resume = k0 != 0;
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      lo[p][r] = resume ? _mm256_loadu_ps(y + r * ldy + p * PANEL) : _mm256_setzero_ps();
      hi[p][r] = resume ? _mm256_loadu_ps(y + r * ldy + p * PANEL + 8) : _mm256_setzero_ps();
    }
  const float* xk = x + k0;
  const W* wk = panel + k0 * PANEL;
  const int64_t panel_size = in * PANEL;
  for (int64_t k = k0; k < k1; ++k, ++xk, wk += PANEL) {
    __m256 w0[P], w1[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) load_weights(wk + p * panel_size, w0[p], w1[p]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(xk + r * in);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        lo[p][r] = _mm256_fmadd_ps(w0[p], b, lo[p][r]);
        hi[p][r] = _mm256_fmadd_ps(w1[p], b, hi[p][r]);
      }
    }
  }
  if (scales != nullptr && k1 == in) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const __m256 s0 = _mm256_loadu_ps(scales + p * PANEL), s1 = _mm256_loadu_ps(scales + p * PANEL + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        lo[p][r] = _mm256_mul_ps(lo[p][r], s0);
        hi[p][r] = _mm256_mul_ps(hi[p][r], s1);
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(y + r * ldy + p * PANEL, lo[p][r]);
      _mm256_storeu_ps(y + r * ldy + p * PANEL + 8, hi[p][r]);
    }
}

template <typename W, int P>
inline void row_block(int64_t rows, const float* x, int64_t in, const W* panel, const float* scales, float* y,
                      int64_t ldy, int64_t k0, int64_t k1) {
  switch (rows) {
    case 6: tile<W, 6, P>(x, in, panel, scales, y, ldy, k0, k1); break;
    case 5: tile<W, 5, P>(x, in, panel, scales, y, ldy, k0, k1); break;
    case 4: tile<W, 4, P>(x, in, panel, scales, y, ldy, k0, k1); break;
    case 3: tile<W, 3, P>(x, in, panel, scales, y, ldy, k0, k1); break;
    case 2: tile<W, 2, P>(x, in, panel, scales, y, ldy, k0, k1); break;
    default: tile<W, 1, P>(x, in, panel, scales, y, ldy, k0, k1); break;
  }
}

// All rows times `count` adjacent panels (1 to panels_at_once(rows)), block of inputs by block,
// every row group over a block while it is in L1.
template <typename W>
inline void panels_product(const float* x, int64_t rows, int64_t in, const W* panel, int64_t count,
                           const float* scales, float* y, int64_t ldy) {
  for (int64_t k0 = 0; k0 < in; k0 += DEPTH) {
    const int64_t k1 = std::min(in, k0 + DEPTH);
    for (int64_t r = 0; r < rows; r += ROW_BLOCK) {
      const int64_t block = std::min<int64_t>(ROW_BLOCK, rows - r);
      if (count == ONE_ROW_PANELS && rows == 1) {
        tile<W, 1, ONE_ROW_PANELS>(x, in, panel, scales, y, ldy, k0, k1);
        continue;
      }
      if (count == TWO_ROW_PANELS && block <= 2) {
        row_block<W, TWO_ROW_PANELS>(block, x + r * in, in, panel, scales, y + r * ldy, ldy, k0, k1);
        continue;
      }
      for (int64_t p = 0; p < count; ++p)
        row_block<W, 1>(block, x + r * in, in, panel + p * in * PANEL, scales ? scales + p * PANEL : nullptr,
                        y + r * ldy + p * PANEL, ldy, k0, k1);
    }
  }
}

template <typename W>
at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, const float* scales, int64_t out) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x: float32 [..., in]");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == PANEL,
              "packed: [panels, in, 16], contiguous");
  const int64_t in = x.size(-1), panels = packed.size(0), full = out / PANEL;
  TORCH_CHECK(packed.size(1) == in && panels == (out + PANEL - 1) / PANEL,
              "shapes: x [..., in], packed [ceil(out / 16), in, 16]");
  const at::Tensor input = x.contiguous();
  const int64_t rows = in ? input.numel() / in : 0;
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = out;
  at::Tensor y = at::empty(sizes, input.options());
  if (rows == 0) return y;
  const float* xp = input.data_ptr<float>();
  const W* wp = packed.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  const int64_t at_once = panels_at_once(rows), groups = (full + at_once - 1) / at_once;
  at::parallel_for(0, groups + (panels > full ? 1 : 0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (g < groups) {
        const int64_t p = g * at_once, count = std::min<int64_t>(at_once, full - p);
        panels_product<W>(xp, rows, in, wp + p * in * PANEL, count, scales ? scales + p * PANEL : nullptr,
                          yp + p * PANEL, out);
        continue;
      }
      // The last panel is partly padding: its real outputs go to y, its real scales come in.
      const int64_t real = out - full * PANEL;
      std::vector<float> last(rows * PANEL), last_scales(PANEL, 0.0f);
      if (scales) std::copy(scales + full * PANEL, scales + out, last_scales.begin());
      panels_product<W>(xp, rows, in, wp + full * in * PANEL, 1, scales ? last_scales.data() : nullptr, last.data(),
                        PANEL);
      for (int64_t r = 0; r < rows; ++r)
        std::copy(last.begin() + r * PANEL, last.begin() + r * PANEL + real, yp + r * out + full * PANEL);
    }
  });
  return y;
}

at::Tensor float32_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat, "packed: float32 weights");
  return matmul<float>(x, packed, nullptr, out);
}

at::Tensor bfloat16_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "packed: bfloat16 weights");
  return matmul<at::BFloat16>(x, packed, nullptr, out);
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kChar, "packed: int8 weights");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales: float32 [out], contiguous");
  TORCH_CHECK(scales.size(0) == out, "scales: float32 [out], contiguous");
  return matmul<int8_t>(x, packed, scales.data_ptr<float>(), out);
}
}  // namespace openelm_matmul

TORCH_LIBRARY_FRAGMENT(openelm_cpu, m) {
  m.def("float32_matmul(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("bfloat16_matmul(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales, int out) -> Tensor");
}
TORCH_LIBRARY_IMPL(openelm_cpu, CPU, m) {
  m.impl("float32_matmul", &openelm_matmul::float32_matmul);
  m.impl("bfloat16_matmul", &openelm_matmul::bfloat16_matmul);
  m.impl("int8_matmul", &openelm_matmul::int8_matmul);
}
"""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] (any of their dtypes) in the kernels' layout [ceil(out / 16), in, 16], as a fresh tensor."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = torch.zeros(panels * PANEL, in_features, dtype=weight.dtype)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain [out, in] weight of a packed one, as a fresh tensor."""
    panels, in_features, _ = packed.shape
    plain = packed.transpose(1, 2).reshape(panels * PANEL, in_features)[:out_features]
    return plain.clone(memory_format=torch.contiguous_format)


def float32_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ weight.T`` for a packed float32 weight (see the invariants above)."""
    return torch.ops.openelm_cpu.float32_matmul(x, packed, out_features)


def bfloat16_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ weight.T`` for a packed bfloat16 weight, in float32 (see the invariants above)."""
    return torch.ops.openelm_cpu.bfloat16_matmul(x, packed, out_features)


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for a packed int8 weight (see the invariants above)."""
    return torch.ops.openelm_cpu.int8_matmul(x, packed, scales, out_features)

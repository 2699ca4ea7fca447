"""Our matmul kernels for the CPU's linear layers: float32, bfloat16 or int8 weights, float32 sums,
built for AVX2 and for AVX-512.

The weights are held in panels of 16 outputs (for each input in turn, the 16 outputs' weights side
by side) and multiplied into several activation rows at a time from registers (the classic
register block): with AVX2, 6 rows x 1 panel in 12 accumulators, every block of 256 inputs of a
panel staying in L1 while all row groups pass over it; with AVX-512 (32 registers of 16 floats),
8 rows x 3 panels in 24, over blocks of 128 inputs. bfloat16 and int8 weights are widened to
float32 as they are read (int8's per-output scales applied at the end): the memory traffic of
their size, the arithmetic of float32. One or two rows take several panels at once (AVX2: three
for one row, two for two; AVX-512: four), so that more sums are in flight.

Why our own: on the 2-core AMD EPYC we develop on, oneDNN (PyTorch's faster float32 path there)
reads a one-stream decode step's weights at 17-23 GB/s of the 26-33 the memory gives and reaches
60-75 GFLOP/s for 16 rows of a 117-145 peak; PyTorch's int8 weight-only kernel
(``aten._weight_int8pack_mm``) reads under 10 GB/s and reaches ~50 GFLOP/s. On OpenELM-270M's
layers (``python -m bench.cpu_linears``) ours gives there, float32: 22-28 GB/s for one row, 84-97
GFLOP/s for 16, 113-123 for 64; bfloat16: 23-24 GB/s for one row (1.75x float32's speed),
107-110 GFLOP/s for 16; int8: 16-21 GB/s for one row with two panels at once, 19-25 with three,
109-126 GFLOP/s for 16. On a 2-core Intel Xeon with AVX-512, the AVX-512 build does 225 GFLOP/s
for 16 rows in float32 where the AVX2 build does 111, 279 against 179 with int8 weights (one
row: as fast; 270M-sized layers, in L3).

Invariants:

- ``x`` [..., in] float32 (made contiguous); ``packed`` [ceil(out / 16), in, 16] as :func:`pack`
  makes it, float32, bfloat16 or int8, outputs past ``out`` in the last panel zero; ``scales`` (int8)
  float32 [out]. Out: float32 [..., out]: a layer is one call.
- Every output is summed over its inputs in order, in one float32 accumulator (the lanes of a
  vector are outputs, never parts of one sum; a block of inputs hands its partial sums to the
  next through memory, exactly), whatever the number of rows or threads: a row's numbers do not
  depend on its batch, nor on the thread count, nor on the instruction set it was built for.
- Built for AVX2 with our other CPU kernels into one extension, and for AVX-512 into a second one
  where PyTorch runs with AVX-512 (cpu_extension.py, which times both once and keeps the faster);
  where neither can be, the layers keep oneDNN's or PyTorch's kernels.
"""

from __future__ import annotations

import torch

PANEL = 16  # outputs per panel: one AVX-512 vector of float32, or two AVX2 ones
# The instruction sets our matmul is built for (cpu_extension.py), and their operators' namespaces.
NAMESPACES = {"AVX2": "openelm_cpu", "AVX-512": "openelm_cpu_avx512"}

SOURCE = r"""
namespace openelm_matmul {

constexpr int64_t PANEL = 16;

// A panel's 16 float32 sums, and the vector operations on them, for the instructions this build
// targets: one AVX-512 register or two AVX2 ones. Either way every output has its own lane and
// its own chain of fused multiply-adds, so both builds give the same numbers, bit for bit.
#ifdef __AVX512F__
struct Sums { __m512 v; };
using Broadcast = __m512;
inline Sums zero() { return {_mm512_setzero_ps()}; }
inline Sums load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, Sums s) { _mm512_storeu_ps(p, s.v); }
inline Broadcast broadcast(const float* x) { return _mm512_set1_ps(*x); }
inline Sums fmadd(Sums w, Broadcast b, Sums acc) { return {_mm512_fmadd_ps(w.v, b, acc.v)}; }
inline Sums mul(Sums a, Sums b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Sums load_weights(const float* w) { return load(w); }
inline Sums load_weights(const at::BFloat16* w) {  // a bfloat16 is a float's top half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
}
inline Sums load_weights(const int8_t* w) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))))};
}
// 32 registers: 8 rows x 3 panels = 24 sums, 3 weight vectors and a broadcast (the classic
// register block); a block of 128 inputs of 3 float32 panels (24 KB) stays in L1 for every row group.
constexpr int64_t DEPTH = 128;
constexpr int ROW_BLOCK = 8;
constexpr int MANY_ROW_PANELS = 3;
constexpr int ONE_ROW_PANELS = 4;
constexpr int TWO_ROW_PANELS = 4;
#else
struct Sums { __m256 lo, hi; };
using Broadcast = __m256;
inline Sums zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Sums load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, Sums s) { _mm256_storeu_ps(p, s.lo); _mm256_storeu_ps(p + 8, s.hi); }
inline Broadcast broadcast(const float* x) { return _mm256_broadcast_ss(x); }
inline Sums fmadd(Sums w, Broadcast b, Sums acc) {
  return {_mm256_fmadd_ps(w.lo, b, acc.lo), _mm256_fmadd_ps(w.hi, b, acc.hi)};
}
inline Sums mul(Sums a, Sums b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Sums load_weights(const float* w) { return load(w); }
inline Sums load_weights(const at::BFloat16* w) {  // a bfloat16 is a float's top half
  const __m128i* p = reinterpret_cast<const __m128i*>(w);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p + 1)), 16))};
}
inline Sums load_weights(const int8_t* w) {
  const __m128i* p = reinterpret_cast<const __m128i*>(w);
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))))};
}
// 16 registers: 6 rows x 1 panel = 12 sums, 2 weight vectors and a broadcast; a float32 panel's
// block of 256 inputs is 16 KB, in L1 for every row group. Where one or two rows leave the FMA
// units waiting on few chains of sums, adjacent panels share each row's broadcast: one row takes
// 3 (6 sums, 6 weight vectors: int8 weights read ~20% faster than with 2 on a 2-core EPYC; 4
// would need 17 of the 16 registers), two rows take 2 (8 sums, 4 weight vectors).
constexpr int64_t DEPTH = 256;
constexpr int ROW_BLOCK = 6;
constexpr int MANY_ROW_PANELS = 1;
constexpr int ONE_ROW_PANELS = 3;
constexpr int TWO_ROW_PANELS = 2;
#endif

inline int64_t panels_at_once(int64_t rows) {
  return rows == 1 ? ONE_ROW_PANELS : rows == 2 ? TWO_ROW_PANELS : MANY_ROW_PANELS;
}

// R rows x P panels over inputs [k0, k1): y (+)= x . panel, starting from y after the first block;
// after the last block, times the scales (int8 weights).
template <typename W, int R, int P>
inline void tile(const float* x, int64_t in, const W* panel, const float* scales, float* y, int64_t ldy,
                 int64_t k0, int64_t k1) {
  Sums sums[P][R];
  const bool resume = k0 != 0;
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sums[p][r] = resume ? load(y + r * ldy + p * PANEL) : zero();
  const float* xk = x + k0;
  const W* wk = panel + k0 * PANEL;
  const int64_t panel_size = in * PANEL;
  for (int64_t k = k0; k < k1; ++k, ++xk, wk += PANEL) {
    Sums w[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) w[p] = load_weights(wk + p * panel_size);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Broadcast b = broadcast(xk + r * in);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) sums[p][r] = fmadd(w[p], b, sums[p][r]);
    }
  }
  if (scales != nullptr && k1 == in) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const Sums s = load(scales + p * PANEL);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) sums[p][r] = mul(sums[p][r], s);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) store(y + r * ldy + p * PANEL, sums[p][r]);
}

// All `rows` (from 1), ROW_BLOCK at a time, times P panels over inputs [k0, k1).
template <typename W, int P, int R = ROW_BLOCK>
inline void row_blocks(int64_t rows, const float* x, int64_t in, const W* panel, const float* scales, float* y,
                       int64_t ldy, int64_t k0, int64_t k1) {
  for (; rows >= R; rows -= R, x += R * in, y += R * ldy) tile<W, R, P>(x, in, panel, scales, y, ldy, k0, k1);
  if constexpr (R > 1) {
    if (rows > 0) row_blocks<W, P, R - 1>(rows, x, in, panel, scales, y, ldy, k0, k1);
  }
}

// All rows times `count` adjacent panels (1 to panels_at_once(rows)), block of inputs by block,
// every row group over a block while it is in L1.
template <typename W>
inline void panels_product(const float* x, int64_t rows, int64_t in, const W* panel, int64_t count,
                           const float* scales, float* y, int64_t ldy) {
  for (int64_t k0 = 0; k0 < in; k0 += DEPTH) {
    const int64_t k1 = std::min(in, k0 + DEPTH);
    if (count == panels_at_once(rows) && rows == 1) {
      tile<W, 1, ONE_ROW_PANELS>(x, in, panel, scales, y, ldy, k0, k1);
    } else if (count == panels_at_once(rows) && rows == 2) {
      tile<W, 2, TWO_ROW_PANELS>(x, in, panel, scales, y, ldy, k0, k1);
    } else if (count == panels_at_once(rows)) {
      row_blocks<W, MANY_ROW_PANELS>(rows, x, in, panel, scales, y, ldy, k0, k1);
    } else {
      for (int64_t p = 0; p < count; ++p)
        row_blocks<W, 1>(rows, x, in, panel + p * in * PANEL, scales ? scales + p * PANEL : nullptr, y + p * PANEL,
                         ldy, k0, k1);
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


def registration(namespace: str) -> str:
    """The C++ that registers this file's kernels as operators under ``torch.ops.<namespace>``: one
    namespace per instruction set they are built for (cpu_extension.py)."""
    return f"""
TORCH_LIBRARY_FRAGMENT({namespace}, m) {{
  m.def("float32_matmul(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("bfloat16_matmul(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scales, int out) -> Tensor");
}}
TORCH_LIBRARY_IMPL({namespace}, CPU, m) {{
  m.impl("float32_matmul", &openelm_matmul::float32_matmul);
  m.impl("bfloat16_matmul", &openelm_matmul::bfloat16_matmul);
  m.impl("int8_matmul", &openelm_matmul::int8_matmul);
}}
"""


def float32_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int, isa: str) -> torch.Tensor:
    """``x @ weight.T`` for a packed float32 weight, with the kernel built for ``isa`` (see the invariants above)."""
    return getattr(torch.ops, NAMESPACES[isa]).float32_matmul(x, packed, out_features)


def bfloat16_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int, isa: str) -> torch.Tensor:
    """``x @ weight.T`` for a packed bfloat16 weight, in float32 (see the invariants above)."""
    return getattr(torch.ops, NAMESPACES[isa]).bfloat16_matmul(x, packed, out_features)


def int8_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int, isa: str
) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for a packed int8 weight (see the invariants above)."""
    return getattr(torch.ops, NAMESPACES[isa]).int8_matmul(x, packed, scales, out_features)

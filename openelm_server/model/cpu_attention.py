"""Decode attention on the CPU straight from the paged KV cache: our own kernel.

A decode row's attention in PyTorch ops is a gather of the row's key and value blocks into fresh
tensors, a mask, and SDPA over the copies: per layer, two copies of the row's whole context and
about ten small ops. On a 2-core AMD EPYC that was 4 of the 15 ms an OpenELM-270M int8 decode step
spent outside its matmuls. This kernel reads each key and value once, where the block table says
it is: for each row and KV head, the scores of that head's query heads over the row's context,
their softmax, and the weighted sum of the values, in float32.

Invariants:

- ``queries`` [rows, query_heads, head_dim] float32, each row's heads contiguous (rows may lie
  apart: a view of the projection), one query per row (decode);
  ``keys`` / ``values`` one layer's pool [blocks, block_size, kv_heads, head_dim] float32
  contiguous (kv_cache.py), ``head_dim`` a multiple of 8; ``block_table`` [rows, blocks] int64
  (each row contiguous);
  ``lengths`` [rows] int64, the keys each row sees (its position + 1, its own key already
  written). Query head j reads KV head j // (query_heads / kv_heads), as grouped_query_attention
  does. Out: [rows, query_heads * head_dim].
- A row's numbers depend only on its own query, blocks and length, in a fixed order: not on the
  other rows of its step, nor on the thread count.
- Built with cpu_matmul's kernels into one extension (cpu_extension.py).
"""

from __future__ import annotations

import torch

SOURCE = r"""
namespace openelm_attention {

constexpr int64_t TOKENS = 8;  // keys scored together: their 8 dot products end in one vector

// The sum of each of 8 vectors' lanes, as one vector (lane j: the sum of v[j]).
inline __m256 lane_sums(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

at::Tensor paged_decode_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                                  const at::Tensor& block_table, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == at::kFloat && queries.stride(2) == 1 &&
                  queries.stride(1) == queries.size(2),
              "queries: float32 [rows, query_heads, head_dim], heads contiguous");
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kFloat && keys.is_contiguous() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "keys, values: float32 [blocks, block_size, kv_heads, head_dim], contiguous");
  const int64_t rows = queries.size(0), query_heads = queries.size(1), dim = queries.size(2);
  const int64_t block_size = keys.size(1), kv_heads = keys.size(2);
  TORCH_CHECK(keys.size(3) == dim && dim % 8 == 0 && kv_heads > 0 && query_heads % kv_heads == 0,
              "shapes: head_dim equal and a multiple of 8, query_heads a multiple of kv_heads");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kLong && block_table.stride(1) == 1 &&
                  block_table.size(0) == rows, "block_table: int64 [rows, blocks], each row contiguous");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong && lengths.is_contiguous() &&
                  lengths.size(0) == rows, "lengths: int64 [rows], contiguous");
  const int64_t width = block_table.size(1), table_stride = block_table.stride(0), group = query_heads / kv_heads;
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK(length[row] >= 1 && length[row] <= width * block_size,
                "lengths: each row sees 1 to blocks * block_size keys");
  at::Tensor out = at::empty({rows, query_heads * dim}, queries.options());
  const float* q = queries.data_ptr<float>();
  const int64_t row_stride = queries.stride(0);
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const __m256 factor = _mm256_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const float*> cached;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, head = task % kv_heads, seen = length[row];
      const int64_t padded = (seen + TOKENS - 1) / TOKENS * TOKENS;
      const float* query = q + row * row_stride + head * group * dim;
      float* result = o + (row * query_heads + head * group) * dim;
      cached.resize(padded);  // where key t of this head sits; padding repeats the last key
      for (int64_t t = 0; t < padded; ++t) {
        const int64_t position = std::min(t, seen - 1);
        const int64_t slot = table[row * table_stride + position / block_size] * block_size + position % block_size;
        cached[t] = k + (slot * kv_heads + head) * dim;
      }
      scores.resize(group * padded);
      for (int64_t t = 0; t < padded; t += TOKENS)
        for (int64_t g = 0; g < group; ++g) {
          __m256 sums[TOKENS];
          for (int j = 0; j < TOKENS; ++j) sums[j] = _mm256_setzero_ps();
          for (int64_t i = 0; i < dim; i += 8) {
            const __m256 part = _mm256_loadu_ps(query + g * dim + i);
            for (int j = 0; j < TOKENS; ++j)
              sums[j] = _mm256_fmadd_ps(part, _mm256_loadu_ps(cached[t + j] + i), sums[j]);
          }
          _mm256_storeu_ps(scores.data() + g * padded + t, _mm256_mul_ps(lane_sums(sums), factor));
        }
      std::vector<float> totals(group);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * padded;
        std::fill(s + seen, s + padded, -INFINITY);
        const float largest = *std::max_element(s, s + seen);
        const __m256 shift = _mm256_set1_ps(largest);
        __m256 total = _mm256_setzero_ps();
        for (int64_t t = 0; t < padded; t += TOKENS) {
          const __m256 e = openelm_simd::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
          _mm256_storeu_ps(s + t, e);
          total = _mm256_add_ps(total, e);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, total);
        totals[g] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* weights = scores.data() + g * padded;
        float* y = result + g * dim;
        const __m256 inverse = _mm256_set1_ps(1.0f / totals[g]);
        // 64 outputs at a time in 8 registers over all the values; a narrower head a vector at a time.
        int64_t i0 = 0;
        for (; i0 + 64 <= dim; i0 += 64) {
          __m256 acc[8];
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
          for (int64_t t = 0; t < seen; ++t) {
            const __m256 w = _mm256_set1_ps(weights[t]);
            const float* value = v + (cached[t] - k) + i0;
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * c), acc[c]);
          }
          for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + i0 + 8 * c, _mm256_mul_ps(acc[c], inverse));
        }
        for (; i0 < dim; i0 += 8) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t t = 0; t < seen; ++t)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[t]), _mm256_loadu_ps(v + (cached[t] - k) + i0), acc);
          _mm256_storeu_ps(y + i0, _mm256_mul_ps(acc, inverse));
        }
      }
    }
  });
  return out;
}

}  // namespace openelm_attention

TORCH_LIBRARY_FRAGMENT(openelm_cpu, m) {
  m.def("paged_decode_attention(Tensor queries, Tensor keys, Tensor values, Tensor block_table, Tensor lengths, "
        "float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(openelm_cpu, CPU, m) {
  m.impl("paged_decode_attention", &openelm_attention::paged_decode_attention);
}
"""


def paged_decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row over its cached keys and values (see the invariants above)."""
    return torch.ops.openelm_cpu.paged_decode_attention(queries, keys, values, block_table, lengths, scale)

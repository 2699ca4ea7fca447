"""The model's element-wise chains on the CPU in float32, each one call of our own: RMSNorm, the
queries' and keys' norm with their rotary embedding, and SwiGLU's ``silu(gate) * up``.

In PyTorch ops each chain is several calls (``F.rms_norm`` alone is five on the CPU), and at one
decode row every call costs microseconds of dispatch for a few thousand numbers: on a 2-core AMD
EPYC the three chains were about a quarter of the 8-12 ms an OpenELM-270M step spent outside its
matmuls. openelm.py calls these for float32 tensors on the CPU where our kernels build; CUDA
fuses the same chains with torch.compile.

Invariants:

- Inputs float32, the last dimension contiguous; outputs fresh and contiguous. The arithmetic
  is PyTorch's (``x * rsqrt(mean(x^2) + eps) * weight``, rotation ``x * cos + rotate_half(x) *
  sin``, ``silu(gate) * up`` with SiLU from a vectorised exp within 2 ulp), each sum in one fixed
  order: a row's numbers do not depend on its batch or the thread count.
- Built with our other CPU kernels into one extension (cpu_extension.py).
"""

from __future__ import annotations

import torch

SOURCE = r"""
namespace openelm_elementwise {

// 1 / sqrt(mean of squares + eps) of n floats: 8 lanes, then the lanes, then the tail, in order.
inline float inverse_rms(const float* x, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float sum = openelm_simd::lane_sum(acc);
  for (; i < n; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "x: float32 [..., dim]");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == dim &&
                  weight.is_contiguous(), "weight: float32 [dim], contiguous");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t rows = dim ? input.numel() / dim : 0;
  const float* xp = input.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * dim;
      const float inverse = inverse_rms(row, dim, e);
      for (int64_t i = 0; i < dim; ++i) o[r * dim + i] = row[i] * inverse * w[i];
    }
  });
  return out;
}

// qk [tokens, query_heads + kv_heads, dim] (heads contiguous), per-head weights [heads, dim] (any
// stride between heads: expanded views), cos / sin [tokens, 1, dim]: each head normed (no weight),
// times its weight, rotated; out [tokens, heads, dim].
at::Tensor norm_and_rotate(const at::Tensor& qk, const at::Tensor& query_weight, const at::Tensor& key_weight,
                           double eps, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.dim() == 3 && qk.scalar_type() == at::kFloat && qk.stride(2) == 1 && qk.stride(1) == qk.size(2),
              "qk: float32 [tokens, heads, dim], heads contiguous");
  const int64_t tokens = qk.size(0), heads = qk.size(1), dim = qk.size(2), half = dim / 2;
  const int64_t query_heads = query_weight.size(0);
  TORCH_CHECK(dim % 2 == 0 && query_weight.dim() == 2 && key_weight.dim() == 2 &&
                  query_heads + key_weight.size(0) == heads && query_weight.size(1) == dim &&
                  key_weight.size(1) == dim && query_weight.stride(1) == 1 && key_weight.stride(1) == 1 &&
                  query_weight.scalar_type() == at::kFloat && key_weight.scalar_type() == at::kFloat,
              "weights: float32 [query_heads, dim] and [kv_heads, dim], heads adding up to qk's, dim even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == tokens * dim &&
                  sin.numel() == tokens * dim && cos.is_contiguous() && sin.is_contiguous(),
              "cos, sin: float32 [tokens, 1, dim], contiguous");
  at::Tensor out = at::empty({tokens, heads, dim}, qk.options());
  const float* q = qk.data_ptr<float>();
  const float* qw = query_weight.data_ptr<float>();
  const float* kw = key_weight.data_ptr<float>();
  const int64_t qw_stride = query_weight.stride(0), kw_stride = key_weight.stride(0), token_stride = qk.stride(0);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, tokens * heads, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> normed(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t token = task / heads, head = task % heads;
      const float* x = q + token * token_stride + head * dim;
      const float* w = head < query_heads ? qw + head * qw_stride : kw + (head - query_heads) * kw_stride;
      const float inverse = inverse_rms(x, dim, e);
      for (int64_t i = 0; i < dim; ++i) normed[i] = x[i] * inverse * w[i];
      const float* ct = c + token * dim;
      const float* st = s + token * dim;
      float* y = o + task * dim;
      for (int64_t i = 0; i < half; ++i) y[i] = normed[i] * ct[i] + -normed[i + half] * st[i];
      for (int64_t i = half; i < dim; ++i) y[i] = normed[i] * ct[i] + normed[i - half] * st[i];
    }
  });
  return out;
}

// gate_up [..., 2 * hidden]: silu(gate) * up, out [..., hidden].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "gate_up: float32 [..., 2 * hidden]");
  const at::Tensor input = gate_up.contiguous();
  const int64_t hidden = input.size(-1) / 2, rows = hidden ? input.numel() / (2 * hidden) : 0;
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = hidden;
  at::Tensor out = at::empty(sizes, input.options());
  const float* g = input.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = g + r * 2 * hidden;
      const float* up = gate + hidden;
      float* y = o + r * hidden;
      int64_t i = 0;
      for (; i + 8 <= hidden; i += 8) {
        // sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below: e^-|x| never overflows.
        const __m256 x = _mm256_loadu_ps(gate + i);
        const __m256 e = openelm_simd::exp_nonpositive(_mm256_or_ps(x, sign));
        const __m256 numerator = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
        const __m256 sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(up + i)));
      }
      for (; i < hidden; ++i) {
        const float x = gate[i], e = std::exp(-std::fabs(x));
        y[i] = x * ((x >= 0.0f ? 1.0f : e) / (1.0f + e)) * up[i];
      }
    }
  });
  return out;
}

}  // namespace openelm_elementwise

TORCH_LIBRARY_FRAGMENT(openelm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("norm_and_rotate(Tensor qk, Tensor query_weight, Tensor key_weight, float eps, Tensor cos, Tensor sin) "
        "-> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}
TORCH_LIBRARY_IMPL(openelm_cpu, CPU, m) {
  m.impl("rms_norm", &openelm_elementwise::rms_norm);
  m.impl("norm_and_rotate", &openelm_elementwise::norm_and_rotate);
  m.impl("silu_and_mul", &openelm_elementwise::silu_and_mul);
}
"""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.openelm_cpu.rms_norm(x, weight, eps)


def norm_and_rotate(
    qk: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    return torch.ops.openelm_cpu.norm_and_rotate(qk, query_weight, key_weight, eps, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.openelm_cpu.silu_and_mul(gate_up)

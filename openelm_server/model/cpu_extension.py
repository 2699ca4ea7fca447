"""Our CPU kernels (cpu_matmul.py, cpu_attention.py, cpu_elementwise.py) built into one PyTorch
extension on first use; the helpers they share are here.

C++ with AVX2 and FMA, registered as operators under ``torch.ops.openelm_cpu``, compiled by
``torch.utils.cpp_extension`` the first time a process asks for them (about a minute on 2 cores,
cached in PyTorch's extensions directory afterwards), only on CPUs that PyTorch itself runs with
AVX2 or AVX-512. Where that fails (no C++ compiler, no ninja, another architecture), the log says
why once and the model keeps PyTorch's and oneDNN's kernels.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from openelm_server.model import cpu_attention, cpu_elementwise, cpu_matmul

log = logging.getLogger(__name__)

HEADER = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace openelm_simd {

// The lanes of v summed in one fixed order.
inline float lane_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// e^x for x <= 0, Cephes' expf: within 2 ulp, 0 below -87.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

}  // namespace openelm_simd
"""
FALLBACK = "the CPU runs PyTorch's and oneDNN's kernels only"


@functools.cache
def available() -> bool:
    """Whether our kernels run here, built (or loaded) on first call; where not, the log says why, once."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.info("%s: our kernels need AVX2, and PyTorch runs with %s here", FALLBACK, capability)
        return False
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline(
            "openelm_cpu",
            cpp_sources=HEADER + cpu_matmul.SOURCE + cpu_attention.SOURCE + cpu_elementwise.SOURCE,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: all mean "not here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("%s: building ours failed (%s)", FALLBACK, reason[:200])
        return False
    log.info(
        "our CPU kernels are ready (built or loaded in %.1f s; the first build takes about a minute)",
        time.perf_counter() - started,
    )
    return True

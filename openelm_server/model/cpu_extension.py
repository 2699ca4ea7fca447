"""Our CPU kernels (cpu_matmul.py, cpu_attention.py, cpu_elementwise.py) built into one PyTorch
extension on first use; the helpers they share are here.

C++ with AVX2 and FMA, registered as operators under ``torch.ops.openelm_cpu``, compiled by
``torch.utils.cpp_extension`` the first time a process asks for them (about a minute on 2 cores,
cached in PyTorch's extensions directory afterwards), only on CPUs that PyTorch itself runs with
AVX2 or AVX-512. Where that fails (no C++ compiler, no ninja, another architecture), the log says
why once and the model keeps PyTorch's and oneDNN's kernels.

The matmul is also built for AVX-512 where PyTorch runs with it (``torch.ops.openelm_cpu_avx512``):
twice the lanes and registers, so a step of many rows can do twice the arithmetic per
instruction. Whether that is faster depends on the CPU (some run AVX-512 at a lower clock, some
split it into two halves), so :func:`matmul_isa` times both builds here once and keeps the faster;
they give the same numbers, bit for bit, so the choice changes speed only.
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


MATMUL_TIMING_SHAPE = (2048, 2048)  # outputs x inputs: the size of a 270M-1B layer, larger than L2
MATMUL_TIMING_ROWS = (1, 16)  # one stream's decode step and a batch's
MATMUL_TIMING_REPEATS = 7


@functools.cache
def available() -> bool:
    """Whether our kernels run here, built (or loaded) on first call; where not, the log says why, once."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.info("%s: our kernels need AVX2, and PyTorch runs with %s here", FALLBACK, capability)
        return False
    started = time.perf_counter()
    try:
        build(
            "openelm_cpu",
            HEADER
            + cpu_matmul.SOURCE
            + cpu_matmul.registration("openelm_cpu")
            + cpu_attention.SOURCE
            + cpu_elementwise.SOURCE,
            ["-mavx2", "-mfma"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: all mean "not here"
        log.warning("%s: building ours failed (%s)", FALLBACK, first_line(error))
        return False
    log.info(
        "our CPU kernels are ready (built or loaded in %.1f s; the first build takes about a minute)",
        time.perf_counter() - started,
    )
    return True


@functools.cache
def matmul_isas() -> tuple[str, ...]:
    """The instruction sets (keys of cpu_matmul.NAMESPACES) our matmul is built for here: AVX2
    where :func:`available`, and AVX-512 too where PyTorch runs with it and ours builds for it."""
    if not available():
        return ()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return ("AVX2",)
    started = time.perf_counter()
    try:
        build(
            "openelm_cpu_avx512",
            HEADER + cpu_matmul.SOURCE + cpu_matmul.registration("openelm_cpu_avx512"),
            ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
        )
    except Exception as error:
        log.warning("our matmul stays on AVX2: building it for AVX-512 failed (%s)", first_line(error))
        return ("AVX2",)
    log.info(
        "our matmul is built for AVX-512 too (built or loaded in %.1f s; the first build takes about half a minute)",
        time.perf_counter() - started,
    )
    return ("AVX2", "AVX-512")


@functools.cache
def matmul_isa() -> str:
    """The one of :func:`matmul_isas` whose build of our matmul runs fastest here, timed once
    and logged. Needs :func:`available`."""
    isas = matmul_isas()
    if len(isas) == 1:
        return isas[0]
    timings = time_matmuls(isas)
    fastest = min(timings, key=timings.get)
    log.info(
        "our matmul timed on this CPU (float32 and int8 weights %s, %s rows): %s; using %s",
        "x".join(map(str, MATMUL_TIMING_SHAPE)),
        " and ".join(map(str, MATMUL_TIMING_ROWS)),
        ", ".join(f"{isa} {ms:.1f} ms" for isa, ms in timings.items()),
        fastest,
    )
    return fastest


def time_matmuls(isas: tuple[str, ...]) -> dict[str, float]:
    """Per instruction set: milliseconds for our matmul built for it on MATMUL_TIMING_SHAPE with
    float32 and int8 weights at each of MATMUL_TIMING_ROWS, the fastest of MATMUL_TIMING_REPEATS.
    The builds take turns, call by call, so that a load elsewhere on the machine slows both alike."""
    out_features, in_features = MATMUL_TIMING_SHAPE
    weights = {
        "float32": cpu_matmul.pack(torch.rand(out_features, in_features)),
        "int8": cpu_matmul.pack(torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)),
    }
    scales = torch.rand(out_features)
    totals = dict.fromkeys(isas, 0.0)
    for rows in MATMUL_TIMING_ROWS:
        x = torch.rand(rows, in_features)
        for dtype, packed in weights.items():
            fastest = dict.fromkeys(isas, float("inf"))
            for repeat in range(MATMUL_TIMING_REPEATS + 1):  # the first round warms caches and threads up
                for isa in isas:
                    started = time.perf_counter()
                    if dtype == "int8":
                        cpu_matmul.int8_matmul(x, packed, scales, out_features, isa)
                    else:
                        cpu_matmul.float32_matmul(x, packed, out_features, isa)
                    if repeat:
                        fastest[isa] = min(fastest[isa], time.perf_counter() - started)
            for isa in isas:
                totals[isa] += fastest[isa] * 1e3
    return totals


def build(name: str, source: str, instruction_flags: list[str]) -> None:
    """Compile (or load from PyTorch's cache) the extension ``name`` and register its operators."""
    from torch.utils.cpp_extension import load_inline

    load_inline(
        name,
        cpp_sources=source,
        extra_cflags=["-O3", *instruction_flags, "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


def first_line(error: Exception) -> str:
    """An exception's first line, short enough for a log line."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]

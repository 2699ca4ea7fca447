"""Our CPU kernels (cpu_matmul.py, cpu_attention.py) built into one PyTorch extension on first use.

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

from openelm_server.model import cpu_attention, cpu_matmul

log = logging.getLogger(__name__)

HEADER = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>
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
            cpp_sources=HEADER + cpu_matmul.SOURCE + cpu_attention.SOURCE,
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

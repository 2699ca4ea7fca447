"""Building our CPU kernels: C++ with AVX2/FMA, compiled the first time a process asks for one.

Each kernel (int8_cpu.py, float32_cpu.py) is a small PyTorch extension registered as an operator,
built by ``torch.utils.cpp_extension`` into PyTorch's extensions directory (about a minute on 2
cores the first time, a second afterwards). Only on CPUs that PyTorch itself runs with AVX2 or
AVX-512; where the build fails (no C++ compiler, no ninja, another architecture) the log says why
once and the caller keeps PyTorch's kernels.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


def build(name: str, source: str, fallback: str) -> bool:
    """Build (or load the cached build of) extension ``name`` from ``source``; False where it
    cannot run here. ``fallback`` finishes the log line that says what runs instead."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.info("%s: our kernel needs AVX2, and this CPU runs PyTorch with %s", fallback, capability)
        return False
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline(name, cpp_sources=source, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a failed build: all mean "not here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("%s: building our kernel failed (%s)", fallback, reason[:200])
        return False
    log.info(
        "our CPU kernel %s is ready (built or loaded in %.1f s; the first build takes about a minute)",
        name,
        time.perf_counter() - started,
    )
    return True

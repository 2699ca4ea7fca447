"""The CPU's linear-layer kernels, chosen at start-up by timing them on the loaded model.

Kernels win on some CPUs and lose on others: on a 2-core AMD EPYC an OpenELM-270M float32 decode
step took 50 ms with oneDNN (weights reordered once) against 81 ms with PyTorch's default (MKL
sgemm), while on a 2-core Intel Xeon with AVX-512 oneDNN was 25% slower than the default. So the
server times the steps it will run (one decode step of 1 and of 8 sequences, and a 64-token
prefill) with each kernel that runs here (cpu_linear.py: ours, oneDNN's, PyTorch's) and keeps
the fastest; ``--cpu-linear`` forces one and skips the timing. Either way the weights are held once.

Ours is kept unless another is clearly faster (:data:`OWN_KERNEL_MARGIN`): it is the one whose
numbers for a request do not depend on the other requests in its step (cpu_matmul.py), and all
three differ in rounding, so choosing on a timing's noise would let two starts of one server on
one machine answer differently.

int8 models are timed between our AVX2 kernel (cpu_matmul.py) and PyTorch's, which read the same
int8 weights but differ in precision: ours multiplies in float32, PyTorch's in bfloat16, and a
greedy answer can differ between them. So PyTorch's is taken only when it is clearly faster
(:data:`PYTORCH_INT8_MARGIN`), not on a timing's noise: two starts of one server on one machine
otherwise flipped between them when both took about as long, and answered differently.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from openelm_server.model.cpu_linear import embedding_copy_megabytes, kernels_that_run, use_linears
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.model.quantize import Int8Linear

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 8)
PREFILL_TOKENS = 64
REPEATS = 3
PYTORCH_INT8_MARGIN = 1.5  # how much faster PyTorch's bfloat16 int8 kernel must be than ours
OWN_KERNEL_MARGIN = 1.2  # how much faster another float kernel must be than ours
KERNEL_NAMES = {"own": "ours", "onednn": "oneDNN", "pytorch": "PyTorch"}


@torch.inference_mode()
def time_steps(model: OpenELM) -> float:
    """Milliseconds for one decode step of each of DECODE_ROWS plus one prefill (median of REPEATS each)."""
    rows = max(DECODE_ROWS)
    cache = model.new_kv_cache(rows, PREFILL_TOKENS + 1)
    prompt = torch.ones(1, PREFILL_TOKENS, dtype=torch.long)

    def prefill():
        model.logits(model(prompt, ForwardBatch.build(cache, [0], torch.arange(PREFILL_TOKENS).unsqueeze(0)))[:, -1])

    def decode(count: int):
        positions = torch.full((count, 1), PREFILL_TOKENS)
        model.logits(
            model(torch.ones(count, 1, dtype=torch.long), ForwardBatch.build(cache, list(range(count)), positions))[
                :, -1
            ]
        )

    total = 0.0
    for step in [prefill] + [lambda count=count: decode(count) for count in DECODE_ROWS]:
        step()  # warm-up: first-touch allocations and kernel selection
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        total += statistics.median(times)
    return total * 1e3


def choose_linear_kernels(model: OpenELM, role: str = "") -> str:
    """Time every float kernel that runs here on ``model``, keep the fastest (ours unless another
    is OWN_KERNEL_MARGIN times as fast) and return its name (cpu_linear.KERNELS). ``role`` starts
    the log line (the draft model's choice is its own)."""
    timings = {}
    for kernel in reversed(kernels_that_run(model)):  # PyTorch's first: the plain weights it holds at load
        use_linears(model, kernel)
        timings[kernel] = time_steps(model)
    kept = min(timings, key=timings.get)
    if "own" in timings and timings[kept] * OWN_KERNEL_MARGIN >= timings["own"]:
        kept = "own"
    use_linears(model, kept)
    log.info(
        "%slinear kernels timed on this CPU (decode of %s sequences + a %d-token prefill): %s; using %s "
        "(--cpu-linear to force one)%s",
        role,
        " and ".join(map(str, DECODE_ROWS)),
        PREFILL_TOKENS,
        ", ".join(f"{KERNEL_NAMES[kernel]} {ms:.0f} ms" for kernel, ms in reversed(timings.items())),
        KERNEL_NAMES[kept],
        f"; {KERNEL_NAMES[kept]} holds the token embedding twice, {embedding_copy_megabytes(model):.0f} MB extra"
        if kept != "pytorch" and embedding_copy_megabytes(model)
        else "",
    )
    return kept


def choose_int8_kernels(model: OpenELM, role: str = "") -> str:
    """On the CPU, time the int8 layers with our kernel, then PyTorch's, and keep ours unless
    PyTorch's is PYTORCH_INT8_MARGIN times as fast; returns the kept one ("own" or "pytorch").
    Where ours did not build, PyTorch's stays, untimed."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers or layers[0].cpu_kernel != "own":
        return "pytorch"
    own_ms = time_steps(model)
    for layer in layers:
        layer.use_cpu_kernel("pytorch")
    pytorch_ms = time_steps(model)
    kept = "pytorch" if pytorch_ms * PYTORCH_INT8_MARGIN < own_ms else "own"
    for layer in layers:
        layer.use_cpu_kernel(kept)
    log.info(
        "%sint8 kernels timed on this CPU (decode of %s sequences + a %d-token prefill): ours (AVX2, float32) "
        "%.0f ms, PyTorch's (bfloat16) %.0f ms; using %s (PyTorch's only when %.1fx as fast)",
        role,
        " and ".join(map(str, DECODE_ROWS)),
        PREFILL_TOKENS,
        own_ms,
        pytorch_ms,
        "ours" if kept == "own" else "PyTorch's",
        PYTORCH_INT8_MARGIN,
    )
    return kept

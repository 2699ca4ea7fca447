"""The CPU's linear-layer kernels, chosen at start-up by timing them on the loaded model.

Kernels win on some CPUs and lose on others: on a 2-core AMD EPYC an OpenELM-270M float32 decode
step took 50 ms with oneDNN (weights reordered once) against 81 ms with PyTorch's default (MKL
sgemm), while on a 2-core Intel Xeon with AVX-512 oneDNN was 25% slower than the default. So the
server times the steps it will run with each kernel that runs here (cpu_linear.py: ours,
oneDNN's, PyTorch's) and keeps the fastest; ``--cpu-linear`` forces one and skips the timing.
Either way the weights are held once.

What is timed is what requests cost (:func:`time_requests`): a 64-token prompt and 64 new tokens,
served alone and as one of 8. Kernels differ most between reading a prompt (many rows: the
arithmetic peak) and decoding (few rows: the memory bandwidth), and a request decodes a step per
token: on a 2-core Intel Xeon with AMX, oneDNN's bfloat16 kernels read a 64-token prompt 2.5x as
fast as ours and decoded one stream 1.4x as slowly, so the sum of one step of each kind chose
oneDNN, while over HTTP ours served 1.4x the tokens/s to one client and 1.2x to 16.

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

from openelm_server.model.cpu_linear import (
    bfloat16_weights_run,
    embedding_copy_megabytes,
    kernels_that_run,
    use_bfloat16_throughout,
    use_bfloat16_weights,
    use_linears,
    use_plain_linears,
)
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.model.quantize import Int8Linear

log = logging.getLogger(__name__)

PROMPT_TOKENS = 64
NEW_TOKENS = 64
BATCH = 8  # the request is timed alone and as one of BATCH decoding together
REPEATS = 3
PYTORCH_INT8_MARGIN = 1.5  # how much faster PyTorch's bfloat16 int8 kernel must be than ours
OWN_KERNEL_MARGIN = 1.2  # how much faster another float kernel must be than ours
KERNEL_NAMES = {"own": "ours", "onednn": "oneDNN", "pytorch": "PyTorch"}


@torch.inference_mode()
def time_requests(model: OpenELM) -> float:
    """Milliseconds to serve a PROMPT_TOKENS-token prompt and NEW_TOKENS new tokens twice: alone (a
    prefill, then NEW_TOKENS decode steps of 1 row) and as one of BATCH requests (a prefill, then
    its share of NEW_TOKENS decode steps of BATCH rows). Each step kind is timed, median of REPEATS,
    and multiplied out."""
    cache = model.new_kv_cache(BATCH, PROMPT_TOKENS + 1)
    prompt = torch.ones(1, PROMPT_TOKENS, dtype=torch.long)

    def prefill():
        model.logits(model(prompt, ForwardBatch.build(cache, [0], torch.arange(PROMPT_TOKENS).unsqueeze(0)))[:, -1])

    def decode(count: int):
        positions = torch.full((count, 1), PROMPT_TOKENS)
        model.logits(
            model(torch.ones(count, 1, dtype=torch.long), ForwardBatch.build(cache, list(range(count)), positions))[
                :, -1
            ]
        )

    def median_ms(step) -> float:
        step()  # warm-up: first-touch allocations and kernel selection
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e3

    prefill_ms, alone_ms, batch_ms = median_ms(prefill), median_ms(lambda: decode(1)), median_ms(lambda: decode(BATCH))
    return 2 * prefill_ms + NEW_TOKENS * (alone_ms + batch_ms / BATCH)


TIMED = f"a {PROMPT_TOKENS}-token prompt and {NEW_TOKENS} new tokens, alone and as one of {BATCH}"


def choose_linear_kernels(model: OpenELM, role: str = "") -> str:
    """Time every float kernel that runs here on ``model``, keep the fastest (ours unless another
    is OWN_KERNEL_MARGIN times as fast) and return its name (cpu_linear.KERNELS). ``role`` starts
    the log line (the draft model's choice is its own).

    A bfloat16 model (on a CPU with bfloat16 instructions: elsewhere start-up gives ours its
    weights without timing) runs bfloat16 throughout with oneDNN's or PyTorch's kernels, or
    keeps its bfloat16 weights in ours with float32 for the rest (cpu_linear.use_bfloat16_weights):
    the same bytes of weights per step, float32 arithmetic. That is timed too: on a 2-core Intel
    Xeon with AMX, ours decoded one stream 1.4x as fast as oneDNN's AMX kernels in bfloat16."""
    timings = {}
    for kernel in reversed(kernels_that_run(model)):  # PyTorch's first: the plain weights it holds at load
        use_linears(model, kernel)
        timings[kernel] = time_requests(model)
    weight = model.transformer.token_embeddings.weight
    bfloat16_weights = "own" not in timings and bfloat16_weights_run(weight.device, weight.dtype)
    if bfloat16_weights:
        use_plain_linears(model)
        use_bfloat16_weights(model)
        timings["own"] = time_requests(model)
    kept = min(timings, key=timings.get)
    if "own" in timings and timings[kept] * OWN_KERNEL_MARGIN >= timings["own"]:
        kept = "own"
    if bfloat16_weights and kept != "own":
        use_bfloat16_throughout(model)
    if not (bfloat16_weights and kept == "own"):
        use_linears(model, kept)
    names = (
        {**KERNEL_NAMES, "own": "ours (bfloat16 weights; float32 activations and KV cache)"}
        if bfloat16_weights
        else KERNEL_NAMES
    )
    log.info(
        "%slinear kernels timed on this CPU (%s): %s; using %s (--cpu-linear to force one)%s",
        role,
        TIMED,
        ", ".join(f"{names[kernel]} {ms:.0f} ms" for kernel, ms in sorted(timings.items(), key=order)),
        names[kept],
        f"; {KERNEL_NAMES[kept]} holds the token embedding twice, {embedding_copy_megabytes(model):.0f} MB extra"
        if kept != "pytorch" and embedding_copy_megabytes(model)
        else "",
    )
    return kept


def order(item: tuple[str, float]) -> int:
    """Timings in the order of KERNEL_NAMES, whatever order they were taken in."""
    return list(KERNEL_NAMES).index(item[0])


def choose_int8_kernels(model: OpenELM, role: str = "") -> str:
    """On the CPU, time the int8 layers with our kernel, then PyTorch's, and keep ours unless
    PyTorch's is PYTORCH_INT8_MARGIN times as fast; returns the kept one ("own" or "pytorch").
    Where ours did not build, PyTorch's stays, untimed."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers or layers[0].cpu_kernel != "own":
        return "pytorch"
    own_ms = time_requests(model)
    isa = layers[0].isa
    for layer in layers:
        layer.use_cpu_kernel("pytorch")
    pytorch_ms = time_requests(model)
    kept = "pytorch" if pytorch_ms * PYTORCH_INT8_MARGIN < own_ms else "own"
    for layer in layers:
        layer.use_cpu_kernel(kept)
    log.info(
        "%sint8 kernels timed on this CPU (%s): ours (%s, float32) %.0f ms, PyTorch's (bfloat16) %.0f ms; "
        "using %s (PyTorch's only when %.1fx as fast)",
        role,
        TIMED,
        isa,
        own_ms,
        pytorch_ms,
        "ours" if kept == "own" else "PyTorch's",
        PYTORCH_INT8_MARGIN,
    )
    return kept

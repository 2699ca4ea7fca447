"""The CUDA path, checked and timed in-process: what to run first on a GPU.

    python -m bench.cuda_check                       # fixtures from ../shared/fixtures
    python -m bench.cuda_check --fixtures DIR --out results.json --batches 1,8,32,64

Correctness (each line says PASS or FAIL with its numbers):

1. the shared fixture's reference, float32 on CUDA: every greedy token, and the last-position
   logits within 1e-3 (TF32 stays off, as in the server);
2. the same prompts through the :class:`Engine` with CUDA graphs, all in one batch: greedy tokens
   equal the reference;
3. speculation through the engine (n-gram, and the fixture as its own draft, which must have every
   proposal accepted): greedy tokens equal the reference;
4. int8 weights (float32 and bfloat16 activations) against float32 on the fixture, eager and
   through the engine with CUDA graphs;
5. bfloat16 against float32 on the 3B shape (random weights): relative logit error and top-1
   agreement over a prefill and decode steps;
6. the CUDA-graph decode step against the eager one on the 3B shape in bfloat16: the same logits;
7. steps that read a prompt while others decode, as piecewise graphs (per-token pieces replayed,
   attention eager) against the eager step, on the 3B shape as served: the same logits.

Timings (median of ``--repeats`` after warm-up, CUDA events): decode step at each batch size and
context 512, graph and eager; prefill of 512 and 4 x 512 tokens; the bandwidth roofline; the
kernels of one decode step by GPU time. Then all of it again with the element-wise kernels fused
by torch.compile, as the server runs by default (``--no-compile`` to skip); steps that read a
prompt while others decode, eager and piecewise (with the pieces' capture time); time to first token
inside the engine; one 3B-shaped int8 layer against bfloat16 at each row count (where the int8
kernel stops paying); and the decode steps again with the 3B model's linear layers in int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from openelm_server.engine.async_engine import Engine
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.piecewise_graphs import PiecewiseStep
from openelm_server.engine.request import Request
from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.scheduler import ScheduledRequest
from openelm_server.model.config import OpenELMConfig
from openelm_server.model.kv_cache import BLOCK_SIZE
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.model.quantize import Int8Linear
from openelm_server.startup import compile_elementwise
from openelm_server.testing.checkpoints import published_config
from openelm_server.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

results: dict = {"checks": [], "timings": []}


def report(name: str, passed: bool, **numbers) -> None:
    results["checks"].append({"check": name, "passed": passed, **numbers})
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if passed else 'FAIL'}  {name}: {shown}", flush=True)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


@torch.inference_mode()
def greedy(model: OpenELM, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuations decoded together through the KV cache (eager), and the first logits."""
    device = model.rope_cos.device
    cache = model.new_kv_cache(len(prompts), max(len(p) for p in prompts) + new_tokens)
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    positions = torch.arange(longest).expand(len(prompts), longest).to(device)
    slots = list(range(len(prompts)))
    hidden = model(tokens.to(device), ForwardBatch.build(cache, slots, positions))
    last = hidden[torch.arange(len(prompts), device=device), torch.tensor([len(p) - 1 for p in prompts], device=device)]
    first_logits = model.logits(last).float()
    outputs = [[int(t)] for t in first_logits.argmax(-1)]
    for _ in range(new_tokens - 1):
        step_positions = torch.tensor([len(p) + len(o) - 1 for p, o in zip(prompts, outputs)], device=device)
        step = ForwardBatch.build(cache, slots, step_positions.unsqueeze(1))
        logits = model.logits(model(torch.tensor([o[-1] for o in outputs], device=device).unsqueeze(1), step)[:, -1])
        for output, token in zip(outputs, logits.argmax(-1).tolist()):
            output.append(token)
    return outputs, first_logits


def engine_greedy(
    engine: Engine, prompts: list[list[int]], new_tokens: int, top_logprobs: int | None = None
) -> tuple[list[list[int]], list[list]]:
    """Submit every prompt at once, so that they prefill and decode as one batch; each row's
    tokens, and with ``top_logprobs`` its TokenLogprob per token (else empty lists)."""
    outputs = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def deliver_to(row: int):
        def deliver(event):
            if event.error is not None:
                raise RuntimeError(f"prompt {row} failed: {event.error}")
            outputs[row].extend(event.token_ids)
            logprobs[row].extend(event.logprobs)
            if event.finish_reason is not None:
                done.release()

        return deliver

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=top_logprobs)
    for row, prompt in enumerate(prompts):
        engine.submit(prompt, params, deliver_to(row))
    for _ in prompts:
        if not done.acquire(timeout=120):
            raise TimeoutError("the engine did not finish the reference prompts in 120 s")
    return outputs, logprobs


def parting_gaps(ours: list[list[int]], logprobs: list[list], theirs: list[list[int]]) -> list[float]:
    """Where an engine's greedy row first parts from another's: the engine's own log-probability
    gap there between the token it took and the other's (0 at an exact tie; taken from the
    engine's top-2 logprobs, inf where the other's token is not among them)."""
    gaps = []
    for row_ours, row_logprobs, row_theirs in zip(ours, logprobs, theirs):
        parting = next((i for i, (a, b) in enumerate(zip(row_ours, row_theirs)) if a != b), None)
        if parting is None:
            continue
        top = dict(row_logprobs[parting].top)
        gaps.append(top[row_ours[parting]] - top.get(row_theirs[parting], float("-inf")))
    return gaps


class SharedReference(NamedTuple):
    """The shared fixture's model, tokenizer and greedy reference, as the checks read them."""

    model_dir: Path
    tokenizer_dir: Path
    cases: list
    prompts: list
    new_tokens: int

    @classmethod
    def read(cls, fixtures: Path, checks: str) -> SharedReference | None:
        """None (and a SKIP line naming ``checks``) where the fixture is not there."""
        model_dir, tokenizer_dir = fixtures / "openelm-tiny", fixtures / "llama2-tokenizer"
        if not (model_dir / "reference.json").is_file():
            print(f"SKIP  {checks} checks: {model_dir}/reference.json not found", flush=True)
            return None
        cases = json.loads((model_dir / "reference.json").read_text())["cases"]
        return cls(model_dir, tokenizer_dir, cases, [c["prompt_ids"] for c in cases], len(cases[0]["greedy_ids"]))


def check_reference(fixtures: Path, device: torch.device, label: str = "") -> None:
    reference = SharedReference.read(fixtures, "reference")
    if reference is None:
        return
    model_dir, tokenizer_dir, cases, prompts, new_tokens = reference
    model = load_openelm(model_dir, device=device, dtype=torch.float32, show_progress=False)
    outputs, first_logits = greedy(model, prompts, new_tokens)
    token_matches = sum(o == c["greedy_ids"] for o, c in zip(outputs, cases))
    logit_error = max(
        float((first_logits[row, : len(c["last_logits_head"])].cpu() - torch.tensor(c["last_logits_head"])).abs().max())
        for row, c in enumerate(cases)
    )
    report(
        f"float32 CUDA reproduces the shared reference (eager, batched){label}",
        token_matches == len(cases) and logit_error < 1e-3,
        prompts_exact=f"{token_matches}/{len(cases)}",
        max_logit_abs_error=logit_error,
    )

    tokenizer = load_tokenizer(tokenizer_dir)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8, max_model_len=256, cuda_graphs=True))
    engine.start()
    try:
        engine_outputs, _ = engine_greedy(engine, prompts, new_tokens)
        static_decoder = engine.core.runner.static_decoder
        graphs = len(static_decoder.graphs) if static_decoder else 0
    finally:
        engine.shutdown()
    matches = sum(o == c["greedy_ids"] for o, c in zip(engine_outputs, cases))
    report(
        f"float32 CUDA engine with CUDA graphs reproduces the shared reference{label}",
        matches == len(cases) and graphs > 0,
        prompts_exact=f"{matches}/{len(cases)}",
        graphs_captured=graphs,
    )

    bf16 = load_openelm(model_dir, device=device, dtype=torch.bfloat16, show_progress=False)
    bf16_outputs, bf16_logits = greedy(bf16, prompts, new_tokens)
    agreeing = sum(sum(a == b for a, b in zip(o, c["greedy_ids"])) for o, c in zip(bf16_outputs, cases))
    first_error = relative_error(bf16_logits, first_logits)
    top1 = float((bf16_logits.argmax(-1) == first_logits.argmax(-1)).float().mean())
    report(
        f"bfloat16 CUDA against float32 on the shared fixture{label}",
        first_error < 2e-2,
        first_logits_rel_error=first_error,
        first_top1_agreement=top1,
        greedy_tokens_equal=f"{agreeing}/{len(cases) * new_tokens}",
    )


def random_model(config: OpenELMConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> OpenELM:
    """Random weights made on the GPU in float32 then cast, so both precisions share them."""
    with torch.device("meta"):
        model = OpenELM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in list(model.named_parameters()):
        tensor = torch.randn(parameter.shape, generator=generator, device=device)
        tensor = 1.0 + 0.1 * tensor if name.endswith("norm.weight") else 0.02 * tensor
        tensor = tensor.to(torch.bfloat16)  # as published: both precisions then hold the same weights
        module_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))
    model.rope_tables(device)
    return model.eval()


def check_3b_precision(config: OpenELMConfig, device: torch.device) -> tuple[OpenELM, list, torch.Tensor, float]:
    """The bfloat16 model, the prompts, their float32 logits and the unfused bfloat16 error."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=generator).tolist() for n in (17, 64, 200, 511)]
    new_tokens = 8
    float32 = random_model(config, torch.float32, device)
    f32_outputs, f32_logits = greedy(float32, prompts, new_tokens)
    check_graph_against_eager(float32, device, "float32", 1e-4)
    del float32
    torch.cuda.empty_cache()
    bf16 = random_model(config, torch.bfloat16, device)
    bf16_outputs, bf16_logits = greedy(bf16, prompts, new_tokens)
    error = relative_error(bf16_logits, f32_logits)
    print(
        "logit std (float32 prefill):",
        float(f32_logits.std()),
        "top-2 margin median:",
        float((f32_logits.topk(2).values[:, 0] - f32_logits.topk(2).values[:, 1]).median()),
        flush=True,
    )
    top1 = float((bf16_logits.argmax(-1) == f32_logits.argmax(-1)).float().mean())
    agreeing = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(bf16_outputs, f32_outputs))
    # The error grows with depth (1.5% over the fixture's 4 layers): 36 layers of random weights
    # give near-flat logits whose top-2 margins are under bfloat16's resolution.
    report(
        "bfloat16 against float32 on the 3B shape (random weights, 36 layers)",
        error < 1e-1,
        prefill_logits_rel_error=error,
        prefill_top1_agreement=top1,
        greedy_tokens_equal=f"{agreeing}/{len(prompts) * new_tokens}",
    )
    check_graph_against_eager(bf16, device, "bfloat16", 2e-2)
    return bf16, prompts, f32_logits, error


@torch.inference_mode()
def check_graph_against_eager(model: OpenELM, device: torch.device, dtype_name: str, tolerance: float) -> None:
    batch, context = 8, 300
    cache = model.new_kv_cache(batch, 512)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator).to(device)
    positions = torch.arange(context, device=device).expand(batch, context)
    model(prompt, ForwardBatch.build(cache, list(range(batch)), positions))
    slots = [0, 2, 3, 5]  # not consecutive: graphs decode a prefix of slots and pick rows
    tokens = [11, 22, 33, 44]
    step_positions = [context, context - 7, context, context - 100]
    eager_step = ForwardBatch.build(cache, slots, torch.tensor(step_positions, device=device).unsqueeze(1))
    eager = model.logits(model(torch.tensor(tokens, device=device).unsqueeze(1), eager_step)[:, -1]).float()
    tables = [cache.slot_block_table(slot, position + 1) for slot, position in zip(slots, step_positions)]
    static = StaticDecoder(model, cache, batch, len(cache.slot_block_table(0, 512)), capture=True)
    graphed = static.decode(tokens, step_positions, tables).float()
    error = relative_error(graphed, eager)
    report(
        f"CUDA-graph decode equals eager decode (3B shape, {dtype_name}, scattered slots)",
        error < tolerance,
        logits_rel_error=error,
        top1_equal=int((graphed.argmax(-1) == eager.argmax(-1)).sum()),
    )


def weight_bytes_per_step(model: OpenELM) -> int:
    """Bytes of weights one decode step reads: every layer's, and the embedding table whole only
    where it is also the output layer (with int8, the logits read an int8 copy instead)."""
    tensors = [*model.parameters(), *model.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if model.lm_head is not None:
        embedding = model.transformer.token_embeddings.weight
        total -= embedding.numel() * embedding.element_size()
    return total


def cuda_time(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def time_steps(
    model: OpenELM, batches: list[int], context: int, repeats: int, bandwidth_gb_s: float, variant: str
) -> None:
    device = model.rope_cos.device
    slots = max(batches)
    cache = model.new_kv_cache(slots, 1024)
    weight_bytes = weight_bytes_per_step(model)
    static = StaticDecoder(model, cache, slots, len(cache.slot_block_table(0, 1024)), capture=True)
    for batch in batches:
        tokens = list(range(100, 100 + batch))
        positions = [context - 1] * batch
        rows = list(range(batch))
        tables = [cache.slot_block_table(row, context) for row in rows]
        graph_ms = cuda_time(lambda: static.decode(tokens, positions, tables), repeats)

        def eager():
            step = ForwardBatch.build(cache, rows, torch.tensor(positions, device=device).unsqueeze(1))
            return model.logits(model(torch.tensor(tokens, device=device).unsqueeze(1), step)[:, -1])

        eager_ms = cuda_time(eager, repeats)
        kv_bytes = (
            cache.bytes_per_token(model.config.num_kv_heads, model.config.head_dim, cache.keys[0].dtype)
            * batch
            * (context + 1)
        )
        floor_ms = (weight_bytes + kv_bytes) / (bandwidth_gb_s * 1e9) * 1e3
        row = {
            "what": "decode step",
            "variant": variant,
            "batch": batch,
            "context": context,
            "graph_ms": graph_ms,
            "eager_ms": eager_ms,
            "graph_tok_s": batch / graph_ms * 1e3,
            "bandwidth_floor_ms": floor_ms,
            "graph_vs_floor": floor_ms / graph_ms,
        }
        results["timings"].append(row)
        print(
            f"{variant}: decode  batch {batch:3d} @ {context}: "
            f"graph {graph_ms:7.2f} ms ({row['graph_tok_s']:7.0f} tok/s), "
            f"eager {eager_ms:7.2f} ms, floor {floor_ms:6.2f} ms ({row['graph_vs_floor']:.0%} of roofline)",
            flush=True,
        )
    for rows_count, length in ((1, 512), (4, 512), (1, 2000)):
        tokens = torch.randint(3, model.config.vocab_size, (rows_count, length), device=device)
        positions = torch.arange(length, device=device).expand(rows_count, length)
        prefill_cache = model.new_kv_cache(rows_count, length)

        def prefill():
            step = ForwardBatch.build(prefill_cache, list(range(rows_count)), positions)
            return model.logits(model(tokens, step)[:, -1])

        ms = cuda_time(prefill, max(3, repeats // 4))
        flops = 2 * sum(p.numel() for p in model.parameters()) * rows_count * length
        row = {
            "what": "prefill",
            "variant": variant,
            "batch": rows_count,
            "tokens": length,
            "ms": ms,
            "tok_s": rows_count * length / ms * 1e3,
            "tflop_s_linear": flops / ms / 1e9,
        }
        results["timings"].append(row)
        print(
            f"{variant}: prefill {rows_count} x {length}: {ms:7.1f} ms ({row['tok_s']:8.0f} tok/s, "
            f"{row['tflop_s_linear']:.0f} TFLOP/s in the weights' matmuls)",
            flush=True,
        )


@torch.inference_mode()
def check_mixed_steps(model: OpenELM, repeats: int, variant: str, tolerance: float = 2e-2) -> None:
    """Steps of decodes plus one prompt chunk (as the scheduler makes them while a prompt is
    read): piecewise graphs against the eager step, same logits, and both timed."""
    context, max_tokens = 512, 2048
    shapes = [(4, 60), (4, 508), (32, 480), (8, 2040)]  # (decoding sequences, prompt chunk tokens)
    decode_blocks = -(-(context + 1) // BLOCK_SIZE)
    chunk_blocks = -(-max_tokens // BLOCK_SIZE)
    most_decodes = max(d for d, _ in shapes)
    cache = model.new_paged_kv_cache(1 + most_decodes * decode_blocks + chunk_blocks)
    generator = torch.Generator(device=cache.keys[0].device).manual_seed(3)
    for pool in cache.keys + cache.values:
        pool.normal_(generator=generator)  # the decoding sequences' earlier keys, made up
    vocab = model.config.vocab_size

    def request(length: int, first_block: int, blocks: int) -> Request:
        r = Request("r", [3 + (17 * i) % (vocab - 3) for i in range(length)], SamplingParams(max_new_tokens=1))
        r.block_ids = list(range(first_block, first_block + blocks))
        return r

    started = time.perf_counter()
    piecewise = PiecewiseStep(model, cache, max_tokens)
    piecewise.capture_all()
    capture_s = time.perf_counter() - started
    eager_runner = ModelRunner(model, cache, None)
    piecewise_runner = ModelRunner(model, cache, None, piecewise)
    for decodes, chunk in shapes:
        step = [
            ScheduledRequest(request(context + 1, 1 + i * decode_blocks, decode_blocks), context, 1)
            for i in range(decodes)
        ]
        step.append(ScheduledRequest(request(chunk, 1 + most_decodes * decode_blocks, chunk_blocks), 0, chunk))
        wanted = [[0]] * decodes + [[chunk - 1]]
        eager = torch.cat(eager_runner.run(step, wanted)).float()
        graphed = torch.cat(piecewise_runner.run(step, wanted)).float()
        error = relative_error(graphed, eager)
        report(
            f"piecewise graphs equal the eager step ({variant}, {decodes} decodes + a {chunk}-token chunk)",
            error < tolerance,
            logits_rel_error=error,
            top1_equal=f"{int((graphed.argmax(-1) == eager.argmax(-1)).sum())}/{decodes + 1}",
        )
        eager_ms = cuda_time(lambda: eager_runner.run(step, wanted), repeats)
        piecewise_ms = cuda_time(lambda: piecewise_runner.run(step, wanted), repeats)
        row = {
            "what": "mixed step",
            "variant": variant,
            "decodes": decodes,
            "chunk_tokens": chunk,
            "eager_ms": eager_ms,
            "piecewise_ms": piecewise_ms,
            "pieces_captured": len(piecewise.graphs),
            "capture_s": capture_s,
        }
        results["timings"].append(row)
        print(
            f"{variant}: mixed   {decodes:2d} decodes + {chunk:4d}-token chunk: piecewise {piecewise_ms:7.2f} ms, "
            f"eager {eager_ms:7.2f} ms ({len(piecewise.graphs)} pieces captured in {capture_s:.1f} s)",
            flush=True,
        )


@torch.inference_mode()
def profile_decode(model: OpenELM, batch: int, context: int) -> None:
    """The kernels of one eager decode step (a graph replays the same kernels), by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    device = model.rope_cos.device
    cache = model.new_kv_cache(batch, context + 1)
    rows = list(range(batch))
    tokens = torch.arange(100, 100 + batch, device=device).unsqueeze(1)
    positions = torch.full((batch, 1), context - 1, device=device)

    def eager():
        return model.logits(model(tokens, ForwardBatch.build(cache, rows, positions))[:, -1])

    eager()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    print(
        f"profile: decode batch {batch} @ {context}: {len(kernels)} kernels, {busy_us / 1e3:.2f} ms of GPU time",
        flush=True,
    )
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=22, max_name_column_width=70), flush=True)
    results["profile"] = {"batch": batch, "context": context, "kernels": len(kernels), "gpu_ms": busy_us / 1e3}


def check_fused_against_float32(model: OpenELM, prompts: list, f32_logits: torch.Tensor, unfused_error: float) -> None:
    """Fused kernels round once where eager bfloat16 rounds after every op, so they are no farther
    from float32 than the unfused ones."""
    _, fused_logits = greedy(model, prompts, 1)
    error = relative_error(fused_logits, f32_logits)
    report(
        "fused bfloat16 is as close to float32 as unfused bfloat16 (3B shape, prefill)",
        error <= unfused_error * 1.1,
        fused_rel_error=error,
        unfused_rel_error=unfused_error,
    )


def probe_time_to_first_token(model: OpenELM, tokenizer) -> None:
    """Time from submit to the first token inside the engine, for prompts of new lengths (as a
    server sees them) and of a length seen before, after an idle pause (the engine empties the
    CUDA cache when idle) and back to back."""
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_model_len=1024, cuda_graphs=True))
    engine.start()
    try:
        for prompt_length, pause in (
            (400, 0.0),
            (400, 1.0),
            (400, 0.0),
            (401, 0.0),
            (250, 1.0),
            (123, 0.0),
            (456, 0.0),
            (399, 1.0),
        ):
            prompt = torch.randint(3, model.config.vocab_size, (prompt_length,)).tolist()
            time.sleep(pause)
            first, done = threading.Event(), threading.Event()
            stamps = {}

            def deliver(event):
                if "first" not in stamps:
                    stamps["first"] = time.perf_counter()
                    first.set()
                if event.finish_reason is not None or event.error is not None:
                    stamps["done"] = time.perf_counter()
                    done.set()

            submitted = time.perf_counter()
            engine.submit(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), deliver)
            done.wait(60)
            ttft_ms = (stamps["first"] - submitted) * 1e3
            per_token_ms = (stamps["done"] - stamps["first"]) * 1e3 / 7
            results["timings"].append(
                {
                    "what": "engine ttft",
                    "after_idle_s": pause,
                    "prompt": prompt_length,
                    "ttft_ms": ttft_ms,
                    "tpot_ms": per_token_ms,
                }
            )
            print(
                f"engine: {prompt_length}-token prompt after {pause:.0f} s idle: first token {ttft_ms:6.1f} ms, "
                f"then {per_token_ms:5.2f} ms/token",
                flush=True,
            )
    finally:
        engine.shutdown()


def quantize_in_place(model: OpenELM) -> OpenELM:
    """Every linear layer of ``model`` in int8, as ``--quantization int8`` loads it (the tied
    output layer gets an int8 copy of the embedding); the float layers it replaces are freed."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear.quantize(module.weight, name))
    if model.lm_head is None:
        model.lm_head = Int8Linear.quantize(model.transformer.token_embeddings.weight, "output layer")
    return model


def check_int8(fixtures: Path, device: torch.device) -> None:
    """int8 weights on CUDA against float32 on the shared fixture, eager and through the engine
    with CUDA graphs (decode steps of up to CUDA_KERNEL_MAX_ROWS rows use the int8 kernel, longer
    steps the dequantized weight)."""
    reference = SharedReference.read(fixtures, "int8")
    if reference is None:
        return
    model_dir, tokenizer_dir, cases, prompts, new_tokens = reference
    float32 = load_openelm(model_dir, device=device, dtype=torch.float32, show_progress=False)
    _, f32_logits = greedy(float32, prompts, new_tokens)
    del float32
    for dtype in (torch.float32, torch.bfloat16):
        int8 = load_openelm(model_dir, device=device, dtype=dtype, show_progress=False, quantization="int8")
        outputs, logits = greedy(int8, prompts, new_tokens)
        error = relative_error(logits, f32_logits)
        agreeing = sum(sum(a == b for a, b in zip(o, c["greedy_ids"])) for o, c in zip(outputs, cases))
        engine = Engine(int8, load_tokenizer(tokenizer_dir), EngineConfig(max_batch_size=8, max_model_len=256))
        engine.start()
        try:
            engine_outputs, engine_logprobs = engine_greedy(engine, prompts, new_tokens, top_logprobs=2)
        finally:
            engine.shutdown()
        engine_equal = sum(a == b for a, b in zip(engine_outputs, outputs))
        gaps = parting_gaps(engine_outputs, engine_logprobs, outputs)
        # 4.1% on the CPU (README). The engine's steps have other shapes than the eager batch, so
        # other kernel cuts and summation orders: it may part from eager greedy only where two
        # tokens' logits lie within a rounding step or two of each other. In bfloat16 such ties
        # are common: this fixture's logits reach ~40, where bfloat16's values are 0.25 apart.
        near_tie = 2 * torch.finfo(dtype).eps * float(logits.abs().max())
        report(
            f"int8 CUDA ({str(dtype).removeprefix('torch.')} activations) against float32 on the shared fixture",
            error < 6e-2 and all(gap <= near_tie for gap in gaps),
            first_logits_rel_error=error,
            greedy_tokens_equal_reference=f"{agreeing}/{len(cases) * new_tokens}",
            engine_with_graphs_equal_eager=f"{engine_equal}/{len(cases)}",
            engine_logprob_gaps_where_it_parts=[round(gap, 4) for gap in gaps],
            near_tie=round(near_tie, 6),
        )
        del int8


def int8_layer_shapes(config: OpenELMConfig) -> list[tuple[int, int]]:
    """(out, in) of the layers the int8 timings use: the widest (the FFN's gate and up
    projection) and the narrowest, deepest (the FFN's down projection)."""
    return [(2 * max(config.ffn_dims), config.model_dim), (config.model_dim, max(config.ffn_dims))]


@torch.inference_mode()
def time_int8_kernel(config: OpenELMConfig, device: torch.device, repeats: int) -> None:
    """Where the int8 kernel stops paying: one 3B-shaped layer at each row count, our Triton
    kernel against PyTorch's int8 kernel, the dequantized weight and a plain bfloat16 weight."""
    from openelm_server.model.int8_triton import int8_weight_matmul  # Triton: CUDA machines only

    generator = torch.Generator(device=device).manual_seed(3)
    for out_features, in_features in int8_layer_shapes(config):
        weight = 0.02 * torch.randn(out_features, in_features, generator=generator, device=device)
        layer = Int8Linear.quantize(weight, "timing layer")
        bf16_weight = weight.to(torch.bfloat16)
        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            x = torch.randn(rows, in_features, generator=generator, device=device).to(torch.bfloat16)
            x_float = x.float()
            ours = cuda_time(lambda: int8_weight_matmul(x, layer.weight, layer.scales), repeats)
            pytorch = cuda_time(
                lambda: torch.ops.aten._weight_int8pack_mm(x_float, layer.weight, layer.scales), repeats
            )
            dequantized = cuda_time(lambda: torch.nn.functional.linear(x, layer.dequantized(x.dtype)), repeats)
            plain = cuda_time(lambda: torch.nn.functional.linear(x, bf16_weight), repeats)
            error = relative_error(int8_weight_matmul(x, layer.weight, layer.scales), x @ layer.dequantized(x.dtype).T)
            results["timings"].append(
                {
                    "what": "int8 layer",
                    "shape": [out_features, in_features],
                    "rows": rows,
                    "triton_int8_ms": ours,
                    "pytorch_int8_ms": pytorch,
                    "dequantized_ms": dequantized,
                    "bfloat16_ms": plain,
                    "triton_rel_error": error,
                }
            )
            print(
                f"int8 layer {out_features}x{in_features}, {rows:3d} rows: ours {ours:.3f} ms, "
                f"PyTorch int8 {pytorch:.3f} ms, dequantized {dequantized:.3f} ms, bfloat16 {plain:.3f} ms "
                f"(ours against the dequantized product: {error:.1e})",
                flush=True,
            )


@torch.inference_mode()
def tune_int8_kernel(config: OpenELMConfig, device: torch.device, repeats: int) -> None:
    """Other cuts of our int8 kernel against its default one, per layer shape and row count:
    the fastest found, its time, the default's and bfloat16's (what to change config_for to)."""
    from triton.runtime.errors import OutOfResources

    from openelm_server.model.int8_triton import KernelConfig, config_for, int8_weight_matmul

    generator = torch.Generator(device=device).manual_seed(4)
    for out_features, in_features in int8_layer_shapes(config):
        weight = 0.02 * torch.randn(out_features, in_features, generator=generator, device=device)
        layer = Int8Linear.quantize(weight, "tuning layer")
        bf16_weight = weight.to(torch.bfloat16)
        for rows in (1, 8, 64):
            x = torch.randn(rows, in_features, generator=generator, device=device).to(torch.bfloat16)
            default = config_for(rows, out_features, in_features)
            timed = {}
            for block_n in (16, 32, 64, 128):
                for block_k in (128, 256):
                    for split_k in (1, 2, 4, 8):
                        for num_warps in (4, 8):
                            cut = KernelConfig(default.block_m, block_n, block_k, split_k, num_warps)
                            try:
                                timed[cut] = cuda_time(
                                    lambda: int8_weight_matmul(x, layer.weight, layer.scales, cut), repeats
                                )
                            except OutOfResources:  # the cut's tiles need more shared memory than the GPU has
                                continue
            best = min(timed, key=timed.get)
            plain = cuda_time(lambda: torch.nn.functional.linear(x, bf16_weight), repeats)
            results["timings"].append(
                {
                    "what": "int8 cuts",
                    "shape": [out_features, in_features],
                    "rows": rows,
                    "best": best.__dict__,
                    "best_ms": timed[best],
                    "default": default.__dict__,
                    "default_ms": timed.get(default, float("nan")),
                    "bfloat16_ms": plain,
                    "every_cut": [{**cut.__dict__, "ms": ms} for cut, ms in timed.items()],
                }
            )
            print(
                f"int8 cuts {out_features}x{in_features}, {rows:2d} rows: best {best} {timed[best]:.3f} ms, "
                f"default {timed.get(default, float('nan')):.3f} ms, bfloat16 {plain:.3f} ms",
                flush=True,
            )


def check_speculation(fixtures: Path, device: torch.device) -> None:
    """Greedy answers unchanged with speculation on CUDA: n-gram, and the fixture as its own
    draft, which must have every proposal accepted."""
    reference = SharedReference.read(fixtures, "speculation")
    if reference is None:
        return
    model_dir, tokenizer_dir, cases, prompts, new_tokens = reference
    tokenizer = load_tokenizer(tokenizer_dir)
    for method in ("ngram", "draft"):
        model = load_openelm(model_dir, device=device, dtype=torch.float32, show_progress=False)
        draft = (
            load_openelm(model_dir, device=device, dtype=torch.float32, show_progress=False)
            if method == "draft"
            else None
        )
        config = EngineConfig(max_batch_size=8, max_model_len=256, max_num_batched_tokens=16, speculative=method)
        engine = Engine(model, tokenizer, config, draft=draft)
        engine.start()
        try:
            outputs, _ = engine_greedy(engine, prompts, new_tokens)
            stats = engine.stats()
        finally:
            engine.shutdown()
        matches = sum(o == c["greedy_ids"] for o, c in zip(outputs, cases))
        everything_accepted = stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens
        report(
            f"speculation ({method}) on CUDA keeps the greedy reference"
            + (", the model as its own draft accepting every proposal" if method == "draft" else ""),
            matches == len(cases) and (everything_accepted or method == "ngram"),
            prompts_exact=f"{matches}/{len(cases)}",
            proposed=stats.spec_draft_tokens,
            accepted=stats.spec_accepted_tokens,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    parser.add_argument("--size", default="3B", choices=("270M", "450M", "1_1B", "3B"))
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="no kernel profiles, and step timings only as served")
    parser.add_argument(
        "--tune-int8",
        action="store_true",
        help="then time 64 cuts of the int8 kernel per layer shape and row count (about a minute, mostly compiling)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then fuse the element-wise kernels as the server does, check and time again",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the CUDA path", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    results["device"] = torch.cuda.get_device_name(device)
    results["torch"] = torch.__version__
    print(f"{results['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    started = time.perf_counter()
    try:
        fixtures = Path(args.fixtures)
        check_reference(fixtures, device)
        check_speculation(fixtures, device)
        check_int8(fixtures, device)
        config = OpenELMConfig.from_dict(published_config(args.size))
        model, prompts, f32_logits, unfused_error = check_3b_precision(config, device)
        from bench.bandwidth import measure_bandwidth

        bandwidth = measure_bandwidth(device="cuda")
        results["bandwidth"] = bandwidth
        read = max(bandwidth["read"]["best_gb_s"], bandwidth["copy"]["best_gb_s"] / 2)
        print(
            f"bandwidth: read {bandwidth['read']['best_gb_s']:.0f}, copy {bandwidth['copy']['best_gb_s']:.0f}, "
            f"gemv {bandwidth['gemv']['best_gb_s']:.0f} GB/s",
            flush=True,
        )
        batches = [int(b) for b in args.batches.split(",")]
        if not args.quick:
            profile_decode(model, 1, args.context)
            time_steps(model, batches, args.context, args.repeats, read, "bfloat16 unfused")
        fused = ""
        if args.compile:
            started_compile = time.perf_counter()
            compile_elementwise(model)
            print(
                f"element-wise kernels fused with torch.compile in {time.perf_counter() - started_compile:.1f} s",
                flush=True,
            )
            check_fused_against_float32(model, prompts, f32_logits, unfused_error)
            check_reference(fixtures, device, " (fused)")
            if not args.quick:
                profile_decode(model, 1, args.context)
            fused = " fused"
        time_steps(model, batches, args.context, args.repeats, read, "bfloat16" + fused)
        check_mixed_steps(model, args.repeats, "bfloat16" + fused)
        tokenizer_dir = fixtures / "llama2-tokenizer"
        if tokenizer_dir.is_dir():
            probe_time_to_first_token(model, load_tokenizer(tokenizer_dir))
        time_int8_kernel(config, device, args.repeats)
        int8 = quantize_in_place(model)
        torch.cuda.empty_cache()
        time_steps(int8, batches, args.context, args.repeats, read, "int8" + fused)
        if args.tune_int8:
            tune_int8_kernel(config, device, max(5, args.repeats // 3))
    finally:  # what ran is kept when a later stage fails or runs out of time
        results["seconds"] = time.perf_counter() - started
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [c["check"] for c in results["checks"] if not c["passed"]]
    print(f"{len(results['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

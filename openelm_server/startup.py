"""From settings to a ready engine: pick the device and dtype, load the model and tokenizer."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from openelm_server.config import Settings
from openelm_server.demo import DemoError
from openelm_server.engine.async_engine import Engine
from openelm_server.engine.config import EngineConfig
from openelm_server.listen import ListenError
from openelm_server.model.config import CheckpointError, OpenELMConfig
from openelm_server.model.cpu_linear import (
    NEEDS,
    bfloat16_weights_run,
    embedding_copy_megabytes,
    kernel_runs,
    kernels_that_run,
    use_bfloat16_weights,
    use_linears,
)
from openelm_server.model.kv_cache import KVCache
from openelm_server.model.linear_choice import choose_int8_kernels, choose_linear_kernels
from openelm_server.model.loader import checkpoint_files, load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM, fuse_elementwise
from openelm_server.model.quantize import QuantizationError, check_int8_support, int8_megabytes
from openelm_server.serving.chat_template import ChatTemplate, ChatTemplateError
from openelm_server.tokenizer import TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

FORCED_KERNEL_NAMES = {"own": "our float32", "onednn": "oneDNN's", "pytorch": "PyTorch's"}

T = TypeVar("T")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StartupError(Exception):
    """A problem that stops the server before it serves; the message is one clear line."""


STARTUP_ERRORS = (
    StartupError,
    ListenError,
    CheckpointError,
    TokenizerError,
    ChatTemplateError,
    DemoError,
    QuantizationError,
)
# CPU instructions that multiply bfloat16 natively (x86: AVX-512 BF16, AMX; Arm: the BF16 extension).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info(
            "device auto: %s",
            "CUDA (" + torch.cuda.get_device_name(device) + ")"
            if device.type == "cuda"
            else "no CUDA GPU found, using the CPU (slow)",
        )
        return device
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StartupError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are present")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); None where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def warn_if_slow_bfloat16(dtype: torch.dtype, device: torch.device, flags: set[str] | None) -> None:
    """bfloat16 works on any CPU, but without bfloat16 instructions PyTorch converts every operand
    to float32 and back: on a 2-core AMD EPYC without AVX-512, OpenELM-270M decoded no faster in
    bfloat16 than in float32 and took 3.6x as long to its first token (BENCHMARKS.md). A user who
    chooses bfloat16 for speed should know."""
    if device.type != "cpu" or dtype != torch.bfloat16 or flags is None:
        return
    if not flags & set(BFLOAT16_CPU_FLAGS):
        log.warning(
            "--dtype bfloat16 on a CPU without bfloat16 instructions (no %s in /proc/cpuinfo): it works, but "
            "prompts take several times as long as in float32 and decoding is no faster; --dtype float32 or "
            "--quantization int8 are faster here",
            " / ".join(BFLOAT16_CPU_FLAGS),
        )


def keeps_bfloat16_weights(
    settings: Settings, device: torch.device, dtype: torch.dtype, flags: set[str] | None
) -> bool:
    """Whether a bfloat16 model on the CPU runs as bfloat16 weights in our kernel with float32
    activations (cpu_linear.use_bfloat16_weights) without timing it against bfloat16 throughout:
    where our kernels build, on a CPU without bfloat16 instructions unless another kernel is
    forced, or with ``--cpu-linear own``. On a CPU with them, start-up times both ways
    (linear_choice.choose_linear_kernels)."""
    if settings.quantization != "none" or not bfloat16_weights_run(device, dtype):
        return False
    no_bfloat16_instructions = flags is not None and not flags & set(BFLOAT16_CPU_FLAGS)
    return settings.cpu_linear == "own" or (settings.cpu_linear == "auto" and no_bfloat16_instructions)


def check_directories(settings: Settings) -> None:
    for label, path, flag, download in (
        ("model", settings.model_path, "--model-path", "bash download.sh"),
        ("tokenizer", settings.tokenizer_path, "--tokenizer-path", "bash download.sh"),
        ("draft model", settings.draft_model_path, "--draft-model-path", "DRAFT=1 bash download.sh"),
    ):
        if path is not None and not Path(path).is_dir():
            raise StartupError(f"{label} directory {path} not found: run `{download}` or pass {flag}")


def check_model_files(settings: Settings) -> OpenELMConfig:
    """config.json and the safetensors files, read before the weights: a wrong directory is
    reported in a second, not after minutes of loading."""
    model_dir = Path(settings.model_path)
    config = OpenELMConfig.from_dir(model_dir)
    checkpoint_files(model_dir)
    return config


def available_memory_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable), or all of it where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# On CUDA the pool takes what --gpu-memory-utilization leaves; on the CPU it may take this much
# of the memory left after the weights, so that the machine keeps room for everything else.
GPU_MEMORY_UTILIZATION = 0.9
CPU_MEMORY_FRACTION = 0.25


def kv_cache_bytes_per_token(model: OpenELM, draft: OpenELM | None, dtype: torch.dtype) -> int:
    """The memory one cached token takes: the model's keys and values in every layer, plus the
    draft model's in its layers, since the draft caches the same tokens in a pool of its own laid
    out by the same block tables (engine/speculative.py)."""
    return sum(
        KVCache.bytes_per_token(m.config.num_kv_heads, m.config.head_dim, dtype)
        for m in (model, draft)
        if m is not None
    )


def kv_cache_tokens_that_fit(
    model: OpenELM, draft: OpenELM | None, settings: Settings, device: torch.device, dtype: torch.dtype
) -> int:
    """--kv-cache-tokens, or what fits the device's memory (see the flag's help) in the model's
    cache and the draft's together. Called once both models are loaded: the free memory measured
    here is what their weights left."""
    per_token = kv_cache_bytes_per_token(model, draft, dtype)
    if settings.kv_cache_tokens is not None:
        tokens = settings.kv_cache_tokens
        reason = f"--kv-cache-tokens {tokens}"
    elif device.type == "cuda":
        utilization = settings.gpu_memory_utilization or GPU_MEMORY_UTILIZATION
        free, total = torch.cuda.mem_get_info(device)
        budget = total * utilization - (total - free)
        tokens = int(budget // per_token)
        reason = f"--gpu-memory-utilization {utilization}"
    else:
        wanted = settings.max_batch_size * settings.max_model_len
        tokens = min(wanted, int(available_memory_bytes() * CPU_MEMORY_FRACTION // per_token))
        reason = f"--max-batch-size x --max-model-len = {wanted}, at most a quarter of the free memory"
    caches = "the model's and the draft model's caches" if draft is not None else "the model's cache"
    if tokens < settings.max_model_len:
        raise StartupError(
            f"{reason}: room for a KV cache of {max(tokens, 0)} tokens ({per_token / 1024:.0f} KiB each in "
            f"{caches}), less than one request of --max-model-len {settings.max_model_len}; lower --max-model-len "
            "or set --kv-cache-tokens"
        )
    log.info("KV cache sized to %d tokens (%.0f MiB in %s) from %s", tokens, tokens * per_token / 2**20, caches, reason)
    return tokens


def compile_elementwise(model: OpenELM) -> None:
    """Fuse the element-wise kernels with torch.compile, or keep them unfused (slower, same
    results) where it cannot run here (no Triton or no C compiler, say)."""
    started = time.perf_counter()
    fuse_elementwise(True)
    device = model.transformer.token_embeddings.weight.device
    cache = model.new_kv_cache(2, 8)
    try:
        with torch.inference_mode():
            # One call per shape class: batch and length of 1 are compiled apart from larger ones.
            for rows, length in ((1, 1), (2, 1), (1, 8), (2, 8)):
                positions = torch.arange(length, device=device).expand(rows, length)
                model(
                    torch.ones(rows, length, dtype=torch.long, device=device),
                    ForwardBatch.build(cache, list(range(rows)), positions),
                )
    except Exception as error:  # torch.compile fails in many ways on machines without its tools
        fuse_elementwise(False)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning(
            "torch.compile cannot run here (%s); element-wise kernels stay unfused: decode is slower, "
            "results are the same; --no-compile skips this attempt",
            reason[:200],
        )
        return
    log.info("element-wise kernels fused with torch.compile in %.1f s", time.perf_counter() - started)


def build_engine(settings: Settings) -> tuple[Engine, object]:
    """The engine, built in a thread that ends before it serves (see :func:`in_passing_thread`)."""
    return in_passing_thread(_build_engine, settings)


def in_passing_thread(function: Callable[..., T], *args) -> T:
    """``function(*args)`` run in a new thread that ends when it returns; its result or its exception.

    PyTorch's CPU kernels run on OpenMP, whose worker pool belongs to the thread that first used
    it. Were the model loaded and its kernels timed on the main thread, that thread would keep a
    pool while the engine thread makes a second one; with more pool threads than cores, libgomp
    stops letting idle workers spin and puts them to sleep after every parallel region: about 500
    wake-ups per decode step, 30-50% slower on a 2-core EPYC (70 -> 105 ms per OpenELM-270M step,
    bench/threads.py). The pool of a thread that has ended is freed, so the engine thread's is the
    only one, and the kernel choice is timed under the conditions the engine will run in.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(function(*args))
        except BaseException as error:  # re-raised on the calling thread
            failure.append(error)

    # A daemon: a stop signal during a long load ends the process without waiting for the load.
    thread = threading.Thread(target=run, name="startup", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def load_served_model(
    path: str, settings: Settings, device: torch.device, dtype: torch.dtype, role: str, bfloat16_weights: bool = False
) -> OpenELM:
    """The model, or the draft, as the flags ask for both: ``--dtype``, ``--quantization``, and
    on the CPU the linear kernels (timed on this model's own shapes, or forced by
    ``--cpu-linear``; with ``bfloat16_weights``, bfloat16 weights in our kernel and float32 for
    the rest). ``role`` starts its log lines ("" for the model)."""
    model = load_openelm(path, device=device, dtype=dtype, quantization=settings.quantization)
    if bfloat16_weights:
        use_bfloat16_weights(model)
        log.info(
            "%slinear layers keep their bfloat16 weights for our CPU kernel, which multiplies in float32; "
            "activations and the KV cache are float32 (--cpu-linear onednn or pytorch for bfloat16 throughout)",
            role,
        )
        return model
    if settings.quantization == "int8":
        # int8 layers are no candidates for the float32 kernel choice below: there is no float weight left.
        log.info(
            "%slinear layers and the output layer in int8 with per-channel scales: %.0f MB",
            role,
            int8_megabytes(model),
        )
        if device.type == "cpu":
            choose_int8_kernels(model, role)
    elif settings.cpu_linear != "auto":
        use_linears(model, settings.cpu_linear)
        extra = embedding_copy_megabytes(model) if settings.cpu_linear != "pytorch" else 0
        log.info(
            "%slinear layers run %s kernel, as --cpu-linear %s asks%s",
            role,
            FORCED_KERNEL_NAMES[settings.cpu_linear],
            settings.cpu_linear,
            f"; the token embedding is held twice, {extra:.0f} MB extra" if extra else "",
        )
    elif len(kernels_that_run(model)) > 1 or bfloat16_weights_run(device, dtype):
        choose_linear_kernels(model, role)
    return model


def _build_engine(settings: Settings) -> tuple[Engine, object]:
    """The checks that need no weights run before the model loads, which takes minutes for 3B."""
    check_directories(settings)
    model_config = check_model_files(settings)
    if settings.draft_model_path is not None:
        draft_config = OpenELMConfig.from_dir(Path(settings.draft_model_path))
        checkpoint_files(Path(settings.draft_model_path))
        if draft_config.vocab_size != model_config.vocab_size:
            raise StartupError(
                f"the draft model in {settings.draft_model_path} has a vocabulary of {draft_config.vocab_size} "
                f"tokens, the model in {settings.model_path} {model_config.vocab_size}: --draft-model-path must "
                "share the model's tokenizer (OpenELM-270M-Instruct drafts for OpenELM-3B-Instruct)"
            )
    tokenizer = load_tokenizer(settings.tokenizer_path)
    if len(tokenizer) > model_config.vocab_size:
        raise StartupError(
            f"the tokenizer in {settings.tokenizer_path} has {len(tokenizer)} tokens, more than the "
            f"model's {model_config.vocab_size}: --tokenizer-path must be the Llama-2 tokenizer"
        )
    ChatTemplate.choose(settings.chat_template, tokenizer)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    flags = cpu_flags()
    bfloat16_weights = keeps_bfloat16_weights(settings, device, dtype, flags)
    if not bfloat16_weights:
        warn_if_slow_bfloat16(dtype, device, flags)
    if settings.quantization == "int8":
        check_int8_support(device)
    if settings.cpu_linear != "auto" and not bfloat16_weights and not kernel_runs(settings.cpu_linear, device, dtype):
        raise StartupError(
            f"--cpu-linear {settings.cpu_linear}: {NEEDS[settings.cpu_linear]}; this server runs "
            f"{str(dtype).removeprefix('torch.')} on {device}: choose another or drop --cpu-linear"
        )
    model = load_served_model(settings.model_path, settings, device, dtype, "", bfloat16_weights)
    if settings.compile and device.type == "cuda":
        compile_elementwise(model)  # rebinds the layers' shared functions: the draft's layers too
    # Loaded before the KV cache is sized, so that the memory measured for it is what both models' weights leave.
    draft = None
    if settings.draft_model_path is not None:
        draft = load_served_model(settings.draft_model_path, settings, device, dtype, "draft model: ", bfloat16_weights)
        log.info("speculative decoding with the draft model in %s", settings.draft_model_path)
    dtype = model.transformer.token_embeddings.weight.dtype  # float32 where bfloat16 weights run in our kernel
    max_model_len = min(settings.max_model_len, model.config.max_context_length)
    if max_model_len < settings.max_model_len:
        log.warning("--max-model-len %d is beyond the model's context; using %d", settings.max_model_len, max_model_len)
    # Every engine setting comes from the flag of the same name; two are fitted to the machine.
    settings = dataclasses.replace(settings, max_model_len=max_model_len)
    config = EngineConfig(
        **{field.name: getattr(settings, field.name) for field in dataclasses.fields(EngineConfig)}
        | {"kv_cache_tokens": kv_cache_tokens_that_fit(model, draft, settings, device, dtype)}
    )
    return Engine(model, tokenizer, config, draft), tokenizer

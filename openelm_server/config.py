"""Every setting of the server in one typed object, built once from CLI flags and env vars.

Each flag has an environment-variable twin (``--model-path`` / ``MODEL_PATH``); a flag given
on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from openelm_server.engine.config import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS, EngineConfig

DEFAULT_MODEL_PATH = "/root/autodl-tmp/OpenELM-3B-Instruct"
DEFAULT_TOKENIZER_PATH = "/root/autodl-tmp/Llama-2-7b-hf"
# --quantization's choices; model/quantize.py holds the same tuple (this module imports no torch).
QUANTIZATIONS = ("none", "int8")
# --cpu-linear's choices: "auto" times the others at start-up (model/cpu_linear.py holds them).
CPU_LINEAR_KERNELS = ("auto", "own", "onednn", "pytorch")
# The names people copy from Hugging Face, ModelScope and the README's examples.
PUBLISHED_MODEL_NAMES = ("OpenELM-3B-Instruct", "apple/OpenELM-3B-Instruct", "LLM-Research/OpenELM-3B-Instruct")


@dataclass(frozen=True)
class Settings:
    model_path: str = DEFAULT_MODEL_PATH
    tokenizer_path: str = DEFAULT_TOKENIZER_PATH
    host: str = "0.0.0.0"
    port: int = 6006
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    served_model_name: str | None = None
    chat_template: str | None = None
    max_batch_size: int = EngineConfig.max_batch_size
    max_model_len: int = EngineConfig.max_model_len
    max_queue: int = EngineConfig.max_queue
    kv_cache_tokens: int | None = EngineConfig.kv_cache_tokens
    max_num_batched_tokens: int | None = EngineConfig.max_num_batched_tokens
    prefix_caching: bool = EngineConfig.prefix_caching
    speculative: str = EngineConfig.speculative
    num_speculative_tokens: int = EngineConfig.num_speculative_tokens
    draft_model_path: str | None = None
    gpu_memory_utilization: float | None = None
    max_tokens_limit: int = 2048
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 1_000_000
    request_timeout: float = 600.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_prompts: bool = True
    cuda_graphs: bool = EngineConfig.cuda_graphs
    compile: bool = True
    cpu_linear: str = "auto"
    webui: bool = True
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    demo: bool = False

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path.rstrip("/")).name or "openelm"

    @property
    def model_aliases(self) -> tuple[str, ...]:
        """Names the OpenAI routes accept besides ``model_name``. Without --served-model-name,
        the published names work whatever the model directory is called, so examples written
        for OpenELM-3B-Instruct run against a renamed folder or another MODEL_ROOT."""
        if self.served_model_name:
            return ()
        return tuple(name for name in PUBLISHED_MODEL_NAMES if name != self.model_name)


def _env_flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None


def _positive_int(value: str) -> int:
    number = _whole_number(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _speculative_tokens(value: str) -> int:
    number = _whole_number(value)
    if not 1 <= number <= MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_SPECULATIVE_TOKENS}, got {number}")
    return number


def _port(value: str) -> int:
    number = _whole_number(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {number}")
    return number


def _positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _fraction(value: str) -> float:
    number = _number(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in value.split(",") if o.strip())


# flag, env var, type, help. Defaults come from the dataclass so that they live in one place.
_OPTIONS: list[tuple[str, str, object, str]] = [
    ("--model-path", "MODEL_PATH", str, "OpenELM model directory (config.json + safetensors)"),
    ("--tokenizer-path", "TOKENIZER_PATH", str, "Llama-2 tokenizer directory (tokenizer.model)"),
    ("--host", "HOST", str, "address to listen on; 0.0.0.0 for all interfaces"),
    ("--port", "PORT", _port, "port to listen on (AutoDL maps 6006 to the outside)"),
    ("--device", "DEVICE", str, "auto | cuda | cuda:N | cpu; auto picks CUDA when present"),
    ("--dtype", "DTYPE", str, "auto | bfloat16 | float16 | float32; auto = bfloat16 on CUDA, float32 on CPU"),
    (
        "--quantization",
        "QUANTIZATION",
        str,
        "none | int8; int8 stores every linear layer's weights as int8 with per-channel scales, made at load "
        "(faster single-stream decode, a quarter of float32's memory; logits a few %% off, see the README)",
    ),
    (
        "--served-model-name",
        "SERVED_MODEL_NAME",
        str,
        "model name in the OpenAI API (default: the model directory's name)",
    ),
    (
        "--chat-template",
        "CHAT_TEMPLATE",
        str,
        "Jinja chat template file for /v1/chat/completions "
        "(default: the tokenizer's own, else OpenELM-Instruct's Zephyr format)",
    ),
    (
        "--max-batch-size",
        "MAX_BATCH_SIZE",
        _positive_int,
        "requests running at once (decoding or reading their prompt)",
    ),
    (
        "--max-model-len",
        "MAX_MODEL_LEN",
        _positive_int,
        "tokens per sequence, prompt included (at most the model's 2048)",
    ),
    ("--max-queue", "MAX_QUEUE", _positive_int, "requests allowed to wait; beyond it the server answers 503"),
    (
        "--kv-cache-tokens",
        "KV_CACHE_TOKENS",
        _positive_int,
        "tokens the KV cache holds, all requests together; a draft model's cache holds as many (default: on "
        "CUDA what --gpu-memory-utilization leaves; on the CPU max-batch-size x max-model-len, capped to a "
        "quarter of the free memory; both count a draft model's weights and cache)",
    ),
    (
        "--max-num-batched-tokens",
        "MAX_NUM_BATCHED_TOKENS",
        _positive_int,
        "tokens computed per step, decodes plus prompt chunks: a long prompt is read in chunks of what is "
        "left, so running streams pause at most one step (default: 256 on the CPU, 512 on CUDA)",
    ),
    (
        "--speculative",
        "SPECULATIVE",
        str,
        "none | ngram | draft: speculative decoding of greedy requests (temperature 0), answers unchanged; "
        "ngram proposes the tokens that followed the last few ones earlier in the prompt and answer "
        "(prompt lookup), draft a smaller model's (--draft-model-path)",
    ),
    (
        "--draft-model-path",
        "DRAFT_MODEL_PATH",
        str,
        "OpenELM model directory of the draft model for --speculative draft (implies it); it must share the "
        "model's tokenizer, e.g. OpenELM-270M-Instruct for the 3B (DRAFT=1 bash download.sh fetches it)",
    ),
    (
        "--num-speculative-tokens",
        "NUM_SPECULATIVE_TOKENS",
        _speculative_tokens,
        f"tokens proposed and verified per step with --speculative (1 to {MAX_SPECULATIVE_TOKENS})",
    ),
    (
        "--gpu-memory-utilization",
        "GPU_MEMORY_UTILIZATION",
        _fraction,
        "on CUDA, fraction of GPU memory for weights + KV cache (0.9 unless set); sizes the KV cache "
        "when --kv-cache-tokens is unset",
    ),
    (
        "--max-tokens-limit",
        "MAX_TOKENS_LIMIT",
        _positive_int,
        "largest max_tokens / max_new_tokens a request may ask for",
    ),
    (
        "--max-prompt-tokens",
        "MAX_PROMPT_TOKENS",
        _positive_int,
        "longest prompt accepted, in tokens (default: max-model-len - 1)",
    ),
    ("--max-body-bytes", "MAX_BODY_BYTES", _positive_int, "largest request body accepted (413 beyond)"),
    (
        "--request-timeout",
        "REQUEST_TIMEOUT",
        _positive_float,
        "seconds a request may take before it is cancelled (503)",
    ),
    ("--api-key", "API_KEY", str, "require 'Authorization: Bearer <key>' on every route but /health"),
    (
        "--cors-origins",
        "CORS_ORIGINS",
        _origins,
        "comma-separated origins allowed by CORS ('*' for any); off by default",
    ),
    (
        "--shutdown-timeout",
        "SHUTDOWN_TIMEOUT",
        _positive_float,
        "seconds running requests get to finish on SIGTERM/SIGINT",
    ),
    ("--log-level", "LOG_LEVEL", str, "debug | info | warning | error"),
    (
        "--cpu-linear",
        "CPU_LINEAR",
        str,
        "auto | own | onednn | pytorch: on the CPU, the kernel of float linear layers: our own (float32, AVX2), "
        "oneDNN's (float32, or bfloat16 on CPUs with bfloat16 instructions) or PyTorch's; auto times those that "
        "run here at start-up and keeps the fastest",
    ),
]

_SWITCHES: list[tuple[str, str, str, str]] = [
    (
        "--prefix-caching",
        "prefix_caching",
        "PREFIX_CACHING",
        "reuse the KV cache of a prompt prefix seen before (a shared system prompt, a conversation's "
        "earlier turns); --no-prefix-caching recomputes every prompt",
    ),
    ("--log-prompts", "log_prompts", "LOG_PROMPTS", "log whole prompts and responses; --no-log-prompts shortens them"),
    (
        "--cuda-graphs",
        "cuda_graphs",
        "CUDA_GRAPHS",
        "on CUDA, replay decode steps as CUDA graphs, and the per-token parts of steps that read "
        "prompts; --no-cuda-graphs to debug",
    ),
    (
        "--compile",
        "compile",
        "COMPILE",
        "on CUDA, fuse element-wise kernels with torch.compile at start-up (faster decode); --no-compile to skip",
    ),
    (
        "--demo",
        "demo",
        "DEMO",
        "try the server without the 6 GB download: a tiny random-weight model and tokenizer are made "
        "(once, in ~/.cache/openelm-server/demo) and served; its answers are gibberish",
    ),
    ("--webui", "webui", "WEBUI", "serve the chat page at GET / for browsers; --no-webui answers a JSON description"),
]


class _Parser(argparse.ArgumentParser):
    """A bad setting is one line, like every other start-up error, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python api.py --help lists the settings)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one; an unset option's help says what happens."""

    def __init__(self, prog: str):
        super().__init__(prog, width=120, max_help_position=40)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == ():
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = _Parser(
        prog="api.py",
        description="Serve OpenELM-3B-Instruct over HTTP: the tutorial's POST / plus an OpenAI-compatible API.",
        epilog="Every flag can also be set by the environment variable shown; flags win.",
        formatter_class=_HelpFormatter,
    )
    for flag, env, kind, help_text in _OPTIONS:
        dest = flag[2:].replace("-", "_")
        parser.add_argument(
            flag, dest=dest, type=kind, metavar=env, default=getattr(defaults, dest), help=f"{help_text} [env {env}]"
        )
    for flag, dest, env, help_text in _SWITCHES:
        parser.add_argument(
            flag,
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=getattr(defaults, dest),
            help=f"{help_text} [env {env}=0|1]",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    parser = build_parser()
    env_args: list[str] = []
    for flag, env, _, _ in _OPTIONS:
        if environ.get(env):
            env_args += [flag, environ[env]]
    for flag, _, env, _ in _SWITCHES:
        if environ.get(env):
            env_args.append(flag if _env_flag(environ[env]) else "--no-" + flag[2:])
    # Parsing the environment as flags first gives env values the same checks as flags.
    namespace = parser.parse_args(env_args + list(sys.argv[1:] if argv is None else argv))
    values = {f.name: getattr(namespace, f.name) for f in fields(Settings)}
    settings = Settings(**values)
    if settings.device != "auto" and settings.device != "cpu" and not settings.device.startswith("cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {settings.device!r}")
    if settings.dtype not in ("auto", "bfloat16", "float16", "float32"):
        parser.error(f"--dtype must be auto, bfloat16, float16 or float32, got {settings.dtype!r}")
    if settings.quantization not in QUANTIZATIONS:
        parser.error(f"--quantization must be {' or '.join(QUANTIZATIONS)}, got {settings.quantization!r}")
    if settings.cpu_linear not in CPU_LINEAR_KERNELS:
        *others, last = CPU_LINEAR_KERNELS
        parser.error(f"--cpu-linear must be {', '.join(others)} or {last}, got {settings.cpu_linear!r}")
    if settings.quantization != "none" and settings.cpu_linear != "auto":
        parser.error(
            f"--cpu-linear chooses the kernel of float linear layers; with --quantization "
            f"{settings.quantization} every linear layer is {settings.quantization}: drop one of them"
        )
    if settings.speculative not in SPECULATIVE_METHODS:
        *others, last = SPECULATIVE_METHODS
        parser.error(f"--speculative must be {', '.join(others)} or {last}, got {settings.speculative!r}")
    if settings.draft_model_path is not None and settings.speculative == "none":
        settings = dataclasses.replace(settings, speculative="draft")
    if settings.speculative == "draft" and settings.draft_model_path is None:
        parser.error("--speculative draft needs the draft model's directory: pass --draft-model-path")
    if settings.speculative == "ngram" and settings.draft_model_path is not None:
        parser.error("--draft-model-path is for --speculative draft, not ngram: drop one of them")
    if settings.log_level not in ("debug", "info", "warning", "error"):
        parser.error(f"--log-level must be debug, info, warning or error, got {settings.log_level!r}")
    if settings.demo and (
        settings.model_path != DEFAULT_MODEL_PATH or settings.tokenizer_path != DEFAULT_TOKENIZER_PATH
    ):
        parser.error(
            "--demo serves a model and tokenizer of its own; drop --model-path / --tokenizer-path "
            "(or MODEL_PATH / TOKENIZER_PATH), or drop --demo"
        )
    return settings

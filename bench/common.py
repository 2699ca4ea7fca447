"""What the benchmarks share: the prompt set, the metrics, machine facts, and server processes.

Nothing here imports torch at module level, so that the HTTP client stays light.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from openelm_server.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
DEFAULT_TOKENIZER = SHARED_FIXTURES / "llama2-tokenizer"

# Common English words, each one token (with its leading space) in the Llama-2 tokenizer, so a
# prompt of n-1 words is exactly n tokens with BOS. With another tokenizer the words that are
# not one token are dropped and the prompt is trimmed to the asked length.
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an had they you were their one all we can her has there been if more when will would who so
no time people water house city river mountain forest garden window door table chair paper book
story music light night morning evening summer winter spring road street car train ship bird fish
tree flower stone fire small large long short high low old new young good great little big early
late first last next other same different important public able open white black red green blue
king queen child children mother father friend family school student teacher market money work
world country state government company system program question answer problem number part place
case week day year hand head eye face voice word name line side point fact group area moment
""".split()


# ---------------------------------------------------------------------------- the prompt set


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    input_len: int  # prompt tokens, BOS included, as the client built it (the server's count wins)
    output_len: int  # max_tokens asked for


def parse_range(text: str) -> tuple[int, int]:
    """'16:512' or '16-512' -> (16, 512); '64' -> (64, 64)."""
    for separator in (":", "-", ","):
        if separator in text:
            low, high = (int(part) for part in text.split(separator, 1))
            break
    else:
        low = high = int(text)
    if low < 1 or high < low:
        raise ValueError(f"bad range {text!r}: need 1 <= low <= high")
    return low, high


def parse_list(text: str, kind=int) -> list:
    return [kind(part) for part in str(text).split(",") if part.strip()]


def load_tokenizer(path: str | Path | None):
    """The Llama-2 tokenizer as the server loads it (slow SentencePiece, adds BOS); None if no path."""
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=False)


def single_token_words(tokenizer) -> list[str]:
    """The words that are one token each; all of them when the tokenizer is not Llama-2's
    (a tiny test tokenizer splits most words, and the prompts are then trimmed to length)."""
    if tokenizer is None:
        return list(WORDS)
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]
    return words if len(words) >= 20 else list(WORDS)


def build_prompts(
    num: int, input_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0, tokenizer=None
) -> list[BenchRequest]:
    """``num`` prompts drawn with a seeded RNG: input length (tokens, BOS included) and output
    length uniform in their ranges, text made of random words. The same arguments give the
    same list, and the first k of a longer list equal a list of k."""
    words = single_token_words(tokenizer)
    requests = []
    for index in range(num):
        rng = random.Random(f"{seed}:{index}")  # per request, so that prefixes of the set agree
        input_len = rng.randint(*input_range)
        output_len = rng.randint(*output_range)
        chosen = [rng.choice(words) for _ in range(max(input_len - 1, 1))]
        prompt = " ".join(chosen)
        if tokenizer is not None:
            # Exact by construction for Llama-2; trim or pad if another tokenizer merges.
            while len(tokenizer(prompt).input_ids) > input_len and len(chosen) > 1:
                chosen.pop()
                prompt = " ".join(chosen)
            while len(tokenizer(prompt).input_ids) < input_len:
                chosen.append(rng.choice(words))
                prompt = " ".join(chosen)
            input_len = len(tokenizer(prompt).input_ids)
        requests.append(BenchRequest(prompt, input_len, output_len))
    return requests


# ---------------------------------------------------------------------------- metrics


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds from its own start."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # perf_counter when sent, to compute the run's span
    end: float = 0.0
    finish_reason: str | None = None
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a single-token answer."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict:
    """mean/std/p50/p90/p99/max of ``values`` times ``scale`` (seconds -> ms by default)."""
    values = [v * scale for v in values]
    if not values:
        return {k: None for k in ("mean", "std", "p50", "p90", "p99", "max", "count")}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {
        "mean": mean,
        "std": std,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "count": len(values),
    }


def aggregate(results: list[RequestResult], duration: float | None = None) -> dict:
    """The run's metrics in vLLM benchmark_serving's sense: TTFT, TPOT (per request, after the
    first token), ITL (every gap between streamed chunks), E2E latency; throughputs over the
    run's wall-clock span (first request sent to last answer done)."""
    done = [r for r in results if r.ok]
    if duration is None:
        duration = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [r.tpot for r in done if r.tpot is not None]
    itls = [gap for r in done for gap in r.itl]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "stopped_early": sum(1 for r in done if r.finish_reason == "stop"),
        "request_throughput": len(done) / duration if duration else None,
        "output_throughput": output_tokens / duration if duration else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else None,
        "ttft_ms": summarize([r.ttft for r in done]),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls),
        "e2el_ms": summarize([r.latency for r in done]),
    }


# ---------------------------------------------------------------------------- facts for the record


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def _package_version(name: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        **{
            name: _package_version(name)
            for name in ("torch", "transformers", "fastapi", "uvicorn", "httpx", "safetensors", "numpy")
        },
    }


def git_revision() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return revision + ("+dirty" if dirty else "") if revision else None
    return None


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "memory_gb": None,
        "load_average": None,
        "gpu": None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_info(model_dir: str | Path | None) -> dict | None:
    """Shape and size of an OpenELM checkpoint directory, from its config.json."""
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        return None
    from openelm_server.model.config import OpenELMConfig
    from openelm_server.model.loader import expected_tensor_shapes

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    config = OpenELMConfig.from_dict(raw)
    parameters = sum(math.prod(s) for s in expected_tensor_shapes(config).values())
    return {
        "dir": str(model_dir),
        "model_type": "openelm",
        "layers": config.num_layers,
        "model_dim": config.model_dim,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "num_query_heads": list(config.num_query_heads),
        "num_kv_heads": list(config.num_kv_heads),
        "ffn_dims": list(config.ffn_dims),
        "parameters": parameters,
        "checkpoint_dtype": raw.get("torch_dtype"),
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value)}")


def cpu_seconds(server: ServerProcess) -> float | None:
    """User + system CPU time of the server so far (psutil), to tell how busy it was."""
    try:
        import psutil

        times = psutil.Process(server.process.pid).cpu_times()
        return times.user + times.system
    except Exception:  # psutil missing or the process gone
        return None

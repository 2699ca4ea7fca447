"""llama.cpp's ``llama-server`` on the same weights as ours, side by side.

llama.cpp is the other server that runs OpenELM natively (after GGUF conversion). This builds it
from the llama.cpp source inside the ``llama-cpp-python`` source package on PyPI, converts our
checkpoint with its own ``convert_hf_to_gguf.py``, checks that it gives the same greedy tokens
as ours, and measures both with ``bench/serve_bench.py`` in one run.

    python -m bench.peers.llama_cpp build       # once: the source package + a CMake build of llama-server (cached)
    python -m bench.peers.llama_cpp check       # same greedy tokens as the shared reference, f32
    python -m bench.peers.llama_cpp compare --size 270M --outtypes f32,bf16,q8_0 --concurrency 1,16

The build lives in ``~/.cache/openelm-server/peers/`` (``--cache``): about 15 minutes on 2 cores
the first time, seconds after. It is built for this machine's CPU (``GGML_NATIVE``), as a user of
llama.cpp would build it. Nothing of llama.cpp is kept in this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

from bench import serve_bench
from bench.common import (
    DEFAULT_TOKENIZER,
    build_prompts,
    load_tokenizer,
    machine_info,
    now_iso,
    parse_list,
    parse_range,
    versions,
    write_json,
)
from openelm_server.model.config import OpenELMConfig
from openelm_server.testing.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]

# The llama-cpp-python release whose vendored llama.cpp was tested here.
LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_CACHE = Path.home() / ".cache" / "openelm-server" / "peers"
SHARED_MODEL = ROOT.parent / "shared" / "fixtures" / "openelm-tiny"
# Ours at the matching precision: the checkpoint's dtype and the flags that serve it.
OURS = {
    "f32": ("float32", []),
    "bf16": ("bfloat16", []),
    "q8_0": ("float32", ["--quantization", "int8"]),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def source_dir(cache: Path) -> Path:
    """The llama.cpp source inside the llama-cpp-python source package, unpacked once."""
    unpacked = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    llama_cpp = unpacked / "vendor" / "llama.cpp"
    if (llama_cpp / "CMakeLists.txt").is_file():
        return llama_cpp
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source package")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                download,
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            ],
            check=True,
        )
        archive = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return llama_cpp


# Compiler flags that keep llama.cpp's AMX kernels out of a native build (GCC lets an explicit
# -mno-* win over what -march=native implies): on a 2-core Intel Xeon KVM guest whose CPU lists
# amx_int8, llama-server's q8_0 died at its first tile instruction (SIGILL at `tilezero` in
# tinygemm_kernel_amx) while oneDNN's AMX kernels ran there.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def build(cache: Path, jobs: int, amx: bool = True) -> Path:
    """``llama-server``, configured and built with CMake unless already there: for this machine's
    CPU (``GGML_NATIVE``), without the AMX kernels when ``amx`` is false (in its own directory)."""
    directory = cache / ("build" if amx else "build-no-amx")
    server = directory / "bin" / "llama-server"
    if server.is_file():
        return server
    source = source_dir(cache)
    log(f"building llama-server from {source} with {jobs} jobs (about 15 minutes on 2 cores)")
    no_amx = [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"] if not amx else []
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(directory),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DGGML_NATIVE=ON",
            *no_amx,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["cmake", "--build", str(directory), "--target", "llama-server", "-j", str(jobs)], check=True)
    return server


def convert(cache: Path, model_dir: Path, tokenizer_dir: Path, outtype: str) -> Path:
    """A GGUF of ``model_dir`` (``f32``, ``bf16`` or ``q8_0``), made once by llama.cpp's converter.

    The converter reads the published, expanded config (per-layer head lists and FFN
    multipliers) and the tokenizer beside the weights, so a staging directory gets both.
    """
    target = cache / "gguf" / f"{model_dir.resolve().name}-{outtype}.gguf"
    if target.is_file() and target.stat().st_mtime > max(p.stat().st_mtime for p in model_dir.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        raw = json.loads((model_dir / "config.json").read_text())
        (staging / "config.json").write_text(json.dumps(published_layout(raw)))
        for item in list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.safetensors.index.json")):
            (staging / item.name).symlink_to(item.resolve())
        for item in tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy(item, staging / item.name)
        log(f"converting {model_dir} to {outtype} GGUF")
        subprocess.run(
            [
                sys.executable,
                str(source_dir(cache) / "convert_hf_to_gguf.py"),
                str(staging),
                "--outtype",
                outtype,
                "--outfile",
                str(target),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return target


def published_layout(raw: dict) -> dict:
    """The config as Apple publishes it, with every per-layer list written out, from the compact
    form that bench/make_checkpoint.py writes (a published config comes back unchanged)."""
    config = OpenELMConfig.from_dict(raw)
    return {
        **raw,
        "architectures": ["OpenELMForCausalLM"],
        "num_query_heads": list(config.num_query_heads),
        "num_kv_heads": list(config.num_kv_heads),
        # per-layer multipliers whose rounding gives back exactly the FFN widths
        "ffn_multipliers": [width / config.model_dim for width in config.ffn_dims],
        "ffn_dim_divisor": int(raw.get("ffn_dim_divisor", 256)),
    }


def start_llama_server(
    server: Path, gguf: Path, slots: int, context: int, threads: int, log_path: Path
) -> ServerProcess:
    """As its README serves many users: ``--parallel`` slots sharing ``--ctx-size`` tokens."""
    port = free_port()
    command = [
        str(server),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * context),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--cont-batching",
        "--no-webui",
    ]
    return ServerProcess(command, port, log_path)


def greedy_tokens(url: str, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import httpx

    response = httpx.post(
        url + "/completion",
        timeout=120,
        json={
            "prompt": prompt_ids,
            "n_predict": new_tokens,
            "temperature": 0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
            "ignore_eos": True,
            "samplers": ["top_k"],
        },
    )
    response.raise_for_status()
    return response.json()["tokens"]


def check(args: argparse.Namespace) -> int:
    """llama.cpp in f32 must reproduce the shared reference's greedy tokens, as ours does."""
    reference_path = SHARED_MODEL / "reference.json"
    if not reference_path.is_file():
        log(f"no {reference_path}: nothing to check against")
        return 2
    cases = json.loads(reference_path.read_text())["cases"]
    server = build(args.cache, args.jobs, args.amx)
    gguf = convert(args.cache, SHARED_MODEL, Path(args.tokenizer), "f32")
    exact = 0
    with start_llama_server(server, gguf, 1, 512, args.threads, args.cache / "check-server.log") as peer:
        peer.wait_ready()
        for number, case in enumerate(cases):
            expected = case["greedy_ids"]
            tokens = greedy_tokens(peer.url, case["prompt_ids"], len(expected))
            exact += tokens == expected
            log(f"prompt {number}: " + ("same greedy tokens" if tokens == expected else f"{tokens} against {expected}"))
    log(f"llama.cpp f32 reproduces {exact}/{len(cases)} reference continuations exactly")
    return 0 if exact == len(cases) else 1


def measure(
    server: ServerProcess, name: str, precision: str, prompts, concurrencies, counts, args: argparse.Namespace
) -> list[dict]:
    """One server's runs at each concurrency, after it is ready and warm."""
    server.wait_ready()
    serve_bench.warm_up(server.url)
    runs = serve_bench.sweep(
        server.url,
        prompts,
        concurrencies,
        None,
        counts,
        args.seed,
        progress=not args.no_progress,
        server=server,
        label=f"{name} {precision}",
        log=log,
    )
    return [{"server": name, "precision": precision, **run} for run in runs]


def compare(args: argparse.Namespace) -> int:
    from bench.run_all import ensure_checkpoint

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{date.today().isoformat()}-llama-cpp-{args.size}"
    server_binary = build(args.cache, args.jobs, args.amx)
    tokenizer = load_tokenizer(args.tokenizer)
    concurrencies, counts = parse_list(args.concurrency), parse_list(args.num_requests)
    prompts = build_prompts(
        max(counts), parse_range(args.input_len), parse_range(args.output_len), args.seed, tokenizer
    )
    context = max(256, max(p.input_len + p.output_len for p in prompts))
    results = {
        "benchmark": "llama.cpp side by side",
        "date": now_iso(),
        "machine": machine_info(),
        "versions": {**versions(), "llama-cpp-python (llama.cpp source)": LLAMA_CPP_PYTHON},
        "size": args.size,
        "threads": args.threads,
        "runs": [],
    }
    checkpoints = {}
    for outtype in parse_list(args.outtypes, str):
        dtype, precision_flags = OURS[outtype]
        checkpoints.setdefault(
            dtype, ensure_checkpoint(args.out_dir / "checkpoints" / f"openelm-{args.size}-{dtype}", args.size, dtype)
        )
        gguf = convert(args.cache, checkpoints[dtype], Path(args.tokenizer), outtype)
        with start_llama_server(
            server_binary, gguf, max(concurrencies), context, args.threads, args.out_dir / f"{stem}-llama-{outtype}.log"
        ) as peer:
            results["runs"] += measure(peer, "llama.cpp", outtype, prompts, concurrencies, counts, args)
        flags = [
            "--device",
            "cpu",
            "--dtype",
            dtype,
            *precision_flags,
            "--max-batch-size",
            str(max(concurrencies)),
            "--max-model-len",
            str(context),
            *args.our_flags.split(),
        ]
        ours = ServerProcess.openelm(
            checkpoints[dtype], args.tokenizer, flags, args.out_dir / f"{stem}-ours-{outtype}.log"
        )
        with ours:
            precision = "int8" if precision_flags else dtype
            results["runs"] += measure(ours, "ours", precision, prompts, concurrencies, counts, args)
    path = write_json(args.out_dir / f"{stem}.json", results)
    table = markdown(results)
    (args.out_dir / f"{stem}.md").write_text(table)
    print("\n" + table)
    log(f"wrote {path}")
    return 0


def markdown(results: dict) -> str:
    lines = [
        "| server | precision | clients | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p99 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['server']} | {run['precision']} | {run['concurrency']} | {run['output_throughput']:.1f} | "
            f"{run['ttft_ms']['p50'] or 0:.0f} | {run['tpot_ms']['p50'] or 0:.0f} | {run['itl_ms']['p99'] or 0:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "check", "compare"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the build and the GGUF files live")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    parser.add_argument(
        "--no-amx",
        dest="amx",
        action="store_false",
        help="build llama.cpp without its AMX kernels (where they crash: a VM that lists AMX but loses tile state)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server threads")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama-2 tokenizer directory")
    parser.add_argument("--size", default="270M", choices=("270M", "450M", "1_1B", "3B"))
    parser.add_argument(
        "--outtypes",
        default="f32,bf16,q8_0",
        help="llama.cpp precisions; ours runs the matching one (q8_0: --quantization int8)",
    )
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--num-requests", default="8,48")
    parser.add_argument("--input-len", default="16:64")
    parser.add_argument("--output-len", default="32:64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--our-flags", default="", help="extra flags for our server")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "build":
        log(f"llama-server: {build(args.cache, args.jobs, args.amx)}")
        return 0
    return check(args) if args.command == "check" else compare(args)


if __name__ == "__main__":
    sys.exit(main())

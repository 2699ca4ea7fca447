"""Single-stream decode and memory at each precision, side by side: float32, int8, bfloat16.

    python -m bench.make_checkpoint --size 270M --dtype float32 --out /tmp/openelm-270M
    python -m bench.precision --model /tmp/openelm-270M --rounds 3

Each round starts ``python api.py`` once per precision, in turn, reads the server's memory once it
is ready (VmRSS, and the peak VmHWM that loading reached, from /proc), sends ``--requests`` greedy
requests one at a time (serve_bench's run at 1 client) and stops it. The order of the precisions
is reversed every other round, so that load from other processes on a shared machine falls on
each alike, and the load average is recorded beside every run. The table gives each run's decode
speed (1 / mean time per output token after the first) and the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
from pathlib import Path

from bench.common import (
    build_prompts,
    git_revision,
    load_tokenizer,
    machine_info,
    model_info,
    now_iso,
    parse_range,
    versions,
    write_json,
)
from bench.serve_bench import run_one, warm_up
from openelm_server.testing.server import ServerProcess

PRECISIONS = {
    "float32": ["--dtype", "float32"],
    "int8": ["--dtype", "float32", "--quantization", "int8"],
    "bfloat16": ["--dtype", "bfloat16"],
}


def memory_mb(pid: int) -> dict:
    """The process's resident memory now and at its peak, in MiB."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = round(int(value.split()[0]) / 1024)
    return {"rss_mb": found.get("VmRSS"), "peak_rss_mb": found.get("VmHWM")}


LINEAR_LAYER_LINES = ("linear kernels timed", "linear layers use oneDNN", "in int8 with per-channel scales")


def linear_kernel_line(log: str) -> str | None:
    """What the start-up logged about its linear layers (the kernel timed and kept, or int8)."""
    for line in log.splitlines():
        if any(text in line for text in LINEAR_LAYER_LINES):
            return line.split(": ", 1)[-1].strip()
    return None


def measure(args: argparse.Namespace, precision: str, prompts, round_index: int) -> dict:
    flags = PRECISIONS[precision] + shlex.split(args.server_flags)
    log_path = Path(args.out).with_suffix("") / f"server-{precision}-{round_index}.log"
    server = ServerProcess.openelm(args.model, args.tokenizer, flags, log_path=log_path)
    try:
        server.wait_ready()
        after_load = memory_mb(server.process.pid)
        warm_up(server.url)
        run = run_one(server.url, prompts, concurrency=1, progress=not args.no_progress, server=server, label=precision)
        after_run = memory_mb(server.process.pid)
        kernels = linear_kernel_line(server.log_tail(200_000))
    finally:
        server.stop()
    tpot = run["tpot_ms"]["mean"]
    return {
        "precision": precision,
        "round": round_index,
        "flags": flags,
        "decode_tokens_per_s": 1000 / tpot if tpot else None,
        "output_throughput": run["output_throughput"],
        "ttft_ms_p50": run["ttft_ms"]["p50"],
        "rss_after_load_mb": after_load["rss_mb"],
        "peak_rss_mb": after_run["peak_rss_mb"],
        "rss_after_run_mb": after_run["rss_mb"],
        "linear_kernels": kernels,
        "load_average_before": run["load_average_before"],
        "load_average_after": run["load_average_after"],
        "failed": run["failed"],
        "run": run,
    }


def markdown(runs: list[dict], precisions: list[str]) -> str:
    lines = [
        "| precision | decode tok/s, median | (each round) | TTFT p50 (ms) | RSS after load (MB) | peak RSS (MB) "
        "| load average (1 min) during the runs |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for precision in precisions:
        mine = [r for r in runs if r["precision"] == precision]
        speeds = [r["decode_tokens_per_s"] for r in mine]
        lines.append(
            f"| {precision} | {statistics.median(speeds):.1f} | {', '.join(f'{s:.1f}' for s in speeds)} "
            f"| {statistics.median(r['ttft_ms_p50'] for r in mine):.0f} "
            f"| {statistics.median(r['rss_after_load_mb'] for r in mine):.0f} "
            f"| {statistics.median(r['peak_rss_mb'] for r in mine):.0f} "
            f"| {', '.join(str(r['load_average_before'][0]) for r in mine)} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (bench.make_checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="Llama-2 tokenizer (default: the shared fixture)")
    parser.add_argument("--precisions", default="float32,int8,bfloat16", help="comma list of " + ", ".join(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per run, sent one at a time")
    parser.add_argument("--input-len", default="16:64")
    parser.add_argument("--output-len", default="64:64")
    parser.add_argument("--server-flags", default="--max-batch-size 8 --max-model-len 256")
    parser.add_argument("--out", default="bench/results/precision.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "llama2-tokenizer"
        args.tokenizer = str(shared) if shared.is_dir() else None
    unknown = [p for p in args.precisions.split(",") if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    precisions = args.precisions.split(",")
    prompts = build_prompts(
        args.requests, parse_range(args.input_len), parse_range(args.output_len), 0, load_tokenizer(args.tokenizer)
    )
    runs = []
    for round_index in range(args.rounds):
        order = precisions if round_index % 2 == 0 else precisions[::-1]
        for precision in order:
            result = measure(args, precision, prompts, round_index)
            runs.append(result)
            print(
                f"round {round_index} {precision}: {result['decode_tokens_per_s']:.1f} tok/s decode, "
                f"TTFT p50 {result['ttft_ms_p50']:.0f} ms, RSS {result['rss_after_load_mb']} MB after load "
                f"(peak {result['peak_rss_mb']}), load {result['load_average_before']}",
                flush=True,
            )
    table = markdown(runs, precisions)
    print(table)
    path = write_json(
        args.out,
        {
            "benchmark": "precision",
            "command": [sys.executable, "-m", "bench.precision", *(sys.argv[1:] if argv is None else argv)],
            "date": now_iso(),
            "git": git_revision(),
            "versions": versions(),
            "machine": machine_info(),
            "model": model_info(args.model),
            "runs": runs,
            "table": table,
        },
    )
    print(f"wrote {path}")
    return 1 if any(r["failed"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

"""One command for the whole comparison: our server against the tutorial's way, side by side.

    python -m bench.run_all                      # CPU: OpenELM-270M shape, float32 (~5-10 min on 2 cores)
    python -m bench.run_all --publish            # ... and copy the JSON/PNG/MD to bench/published/
    python -m bench.run_all --device cuda --size 3B --dtype bfloat16 --concurrency 1,4,16,64,128 \\
        --num-requests 32,64,128,256,256 --input-len 64:512 --output-len 64:256 --baseline-requests 16,32

Steps, all in one session so that the numbers are comparable:

1. a random-weight checkpoint of the published shape (bench/make_checkpoint.py; reused when
   already there), and the deterministic prompt set (bench/common.py);
2. memory bandwidth (bench/bandwidth.py), at the start and after every round (the best counts);
3. both servers started at once on free ports: ``python api.py`` (ours) and
   ``bench/baseline_hf.py serve`` (transformers generate, one request at a time);
4. ``--rounds`` rounds, each the baseline at each ``--baseline-concurrency`` (it serves one
   request at a time, so more clients only queue: its throughput stays, its latency grows) then
   ours at each ``--concurrency``;
   other processes on the machine come and go, so every configuration is reported from its
   least disturbed round (best output throughput; the JSON has every round);
5. results JSON + PNG + a Markdown table in ``--out-dir`` (bench/results/, git-ignored).

With ``--profile``, our server is then sampled by py-spy during one more run at
``--profile-concurrency`` clients (not part of the measured numbers), and the functions that
take its time are summarized in the JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench import serve_bench
from bench.common import (
    DEFAULT_TOKENIZER,
    build_prompts,
    git_revision,
    load_tokenizer,
    machine_info,
    model_info,
    now_iso,
    parse_list,
    parse_range,
    versions,
    write_json,
)
from openelm_server.testing.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_checkpoint(directory: Path, size: str, dtype: str) -> Path:
    """Make the checkpoint unless one of this shape and dtype is already there."""
    config_path = directory / "config.json"
    if config_path.is_file():
        raw = json.loads(config_path.read_text())
        if raw.get("torch_dtype") == dtype and any(directory.glob("*.safetensors")):
            log(f"reusing checkpoint {directory}")
            return directory
    log(f"writing a random-weight OpenELM-{size} checkpoint ({dtype}) to {directory}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.make_checkpoint",
            "--size",
            size,
            "--dtype",
            dtype,
            "--out",
            str(directory),
            "--force",
        ],
        cwd=ROOT,
        check=True,
    )
    return directory


def bandwidth(device: str, label: str) -> dict:
    from bench.bandwidth import measure_bandwidth

    result = measure_bandwidth(device=device)
    result["when"] = label
    log(
        f"memory bandwidth ({label}): read {result['read']['best_gb_s']:.1f}, copy {result['copy']['best_gb_s']:.1f}, "
        f"gemv {result['gemv']['best_gb_s']:.1f} GB/s (best of {result['repeats']})"
    )
    return result


def best_round(runs: list[dict]) -> dict:
    best = max(runs, key=lambda run: run["output_throughput"] or 0)
    return {**best, "output_throughput_by_round": [run["output_throughput"] for run in runs]}


def round_summary(run: dict) -> dict:
    """What the JSON keeps of every round: throughputs, the main percentiles, the conditions."""
    keep = (
        "round",
        "concurrency",
        "completed",
        "failed",
        "duration_s",
        "output_throughput",
        "total_token_throughput",
        "request_throughput",
        "server_cpu_utilization",
        "server_cpu_ms_per_output_token",
        "load_average_before",
        "load_average_after",
        "date",
    )
    summary = {k: run.get(k) for k in keep}
    for metric in ("ttft_ms", "tpot_ms", "e2el_ms"):
        summary[metric] = {k: run[metric][k] for k in ("p50", "p99")}
    return summary


def profile_server(server: ServerProcess, url: str, prompts, concurrency: int, out_dir: Path, stem: str) -> dict | None:
    """py-spy samples our server during one unmeasured run; returns the top functions."""
    py_spy = shutil.which("py-spy")
    if not py_spy:
        log("py-spy not found; pip install py-spy to profile")
        return None
    raw_path = out_dir / f"{stem}-py-spy.txt"
    recorder = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(server.process.pid),
            "--format",
            "raw",
            "--rate",
            "50",
            "--threads",
            "--output",
            str(raw_path),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(2)
    run = serve_bench.run_one(url, prompts, concurrency, label="profiled", progress=False)
    recorder.send_signal(2)  # SIGINT: py-spy writes its file and exits
    try:
        recorder.wait(60)
    except subprocess.TimeoutExpired:
        recorder.kill()
    if not raw_path.is_file():
        log(f"py-spy wrote nothing: {recorder.stderr.read().decode()[-500:]}")
        return None
    summary = summarize_py_spy(raw_path)
    summary.update(
        concurrency=concurrency, output_throughput_while_sampled=run["output_throughput"], raw_file=raw_path.name
    )
    return summary


def summarize_py_spy(raw_path: Path, top: int = 15) -> dict:
    """Collapsed stacks -> where the engine thread spends its samples: by leaf ("self") and
    by any frame on the stack ("inclusive"), as fractions of its samples."""
    self_counts: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = stack.split(";")
        thread = frames[0]
        threads[thread] += count
        if not any("_run (" in frame and "async_engine.py" in frame for frame in frames):
            continue  # not the engine thread (the event loop, idle workers)
        total += count
        names = [_frame_name(f) for f in frames[1:]]
        if names:
            self_counts[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return {
        "engine_samples": total,
        "samples_by_thread": dict(threads.most_common(8)),
        "self": [(name, round(n / total, 3)) for name, n in self_counts.most_common(top)] if total else [],
        "inclusive": [(name, round(n / total, 3)) for name, n in inclusive.most_common(top * 2)] if total else [],
    }


def _frame_name(frame: str) -> str:
    """'forward (openelm_server/openelm.py:201)' -> 'forward (openelm.py:201)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    return f"{name} ({Path(path).name}:{line})" if path else name


def markdown(results: dict) -> str:
    """The tables of BENCHMARKS.md, from the results."""
    ours = results["series"]["openelm_server"]
    baselines = results["series"]["baseline_hf"]
    baseline = baselines[0]
    rows = [
        "| server | clients | requests | req/s | output tok/s | (every round) | total tok/s "
        "| TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) "
        "| E2E p50 / p90 / p99 (ms) | vs baseline (out tok/s) |",
        "|---|---:|---:|---:|---:|---|---:|---|---|---|---|---:|",
    ]

    def triple(metric, keys=("p50", "p90", "p99")):
        return " / ".join("-" if metric[k] is None else f"{metric[k]:.0f}" for k in keys)

    for run in baselines + ours:
        name = "baseline (HF generate)" if run in baselines else "ours (api.py)"
        ratio = run["output_throughput"] / baseline["output_throughput"]
        rows.append(
            f"| {name} | {run['concurrency']} | {run['completed']}/{run['num_requests']} | "
            f"{run['request_throughput']:.2f} | {run['output_throughput']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in run.get('output_throughput_by_round', []))} | "
            f"{run['total_token_throughput']:.1f} | {triple(run['ttft_ms'])} | {triple(run['tpot_ms'])} | "
            f"{triple(run['itl_ms'], ('p50', 'p99'))} | {triple(run['e2el_ms'])} | {ratio:.2f}x |"
        )
    roof = results["roofline"]
    lines = [
        "\n".join(rows),
        "",
        f"Roofline: {roof['weight_bytes'] / 1e9:.3f} GB of weights per decode step / "
        f"{roof['bandwidth_gb_s']:.1f} GB/s = {roof['min_step_ms']:.1f} ms, at most "
        f"{roof['max_decode_tokens_per_s']:.1f} tokens/s for one stream.",
        "",
    ]
    for name, single in results["single_stream"].items():
        lines.append(
            f"- {name}: {single['tokens_per_s']:.1f} tokens/s in decode (1 / mean TPOT at one client) = "
            f"{100 * single['fraction_of_roofline']:.0f}% of the roofline"
        )
    comparison = results["comparison"]
    if comparison.get("ratio_at_16") is not None:
        lines.append(
            f"\nOurs at 16 clients / baseline one at a time (output tokens/s): "
            f"**{comparison['ratio_at_16']:.2f}x** (target >= 6x); round by round: "
            f"{', '.join(f'{x:.2f}x' for x in comparison['ratio_at_16_per_round'])}."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", default="270M", choices=("270M", "450M", "1_1B", "3B"))
    parser.add_argument("--dtype", default="float32", choices=sorted(BYTES), help="weights as served")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama-2 tokenizer directory")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="an existing checkpoint dir, used as it is (default: "
        "bench/results/checkpoints/openelm-SIZE-DTYPE, made if missing)",
    )
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--num-requests", default="8,16,48,128", help="requests per concurrency")
    parser.add_argument("--baseline-concurrency", default="1,4,16")
    parser.add_argument("--baseline-requests", default="8,8,16", help="baseline requests per --baseline-concurrency")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="each round runs the baseline then ours at every concurrency; the best round counts",
    )
    parser.add_argument("--input-len", default="16:64")
    parser.add_argument("--output-len", default="32:64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-flags",
        default=None,
        help="flags for api.py (default: --max-batch-size = the largest concurrency, "
        "--max-model-len to fit the longest request)",
    )
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default=None, help="file stem (default: DATE-cpu or DATE-gpu)")
    parser.add_argument("--publish", action="store_true", help="copy JSON, PNG and MD to bench/published/")
    parser.add_argument("--profile", action="store_true", help="py-spy our server in an extra, unmeasured run")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    stem = args.name or f"{date.today().isoformat()}-{kind}"
    checkpoint_dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
    if args.checkpoint:  # the user's own: used as it is, never rewritten
        checkpoint = Path(args.checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise SystemExit(f"--checkpoint {checkpoint} holds no config.json")
    else:
        checkpoint = ensure_checkpoint(
            out_dir / "checkpoints" / f"openelm-{args.size}-{checkpoint_dtype}", args.size, checkpoint_dtype
        )
    concurrencies = parse_list(args.concurrency)
    counts = parse_list(args.num_requests)
    if len(counts) == 1:
        counts *= len(concurrencies)
    if len(counts) != len(concurrencies):
        raise SystemExit("--num-requests needs one number per --concurrency")
    tokenizer = load_tokenizer(args.tokenizer)
    input_range, output_range = parse_range(args.input_len), parse_range(args.output_len)
    baseline_concurrencies = parse_list(args.baseline_concurrency)
    baseline_counts = parse_list(args.baseline_requests)
    if len(baseline_counts) == 1:
        baseline_counts *= len(baseline_concurrencies)
    if len(baseline_counts) != len(baseline_concurrencies) or baseline_concurrencies[0] != 1:
        raise SystemExit("--baseline-concurrency must start at 1, with one --baseline-requests number each")
    prompts = build_prompts(max(counts + baseline_counts), input_range, output_range, args.seed, tokenizer)
    longest = max(p.input_len + p.output_len for p in prompts)
    flags = (
        shlex.split(args.server_flags)
        if args.server_flags is not None
        else [
            "--max-batch-size",
            str(max(concurrencies)),
            "--max-model-len",
            str(max(256, longest)),
            "--max-queue",
            str(max(256, max(counts))),
        ]
    )
    device_flags = ["--device", args.device, "--dtype", args.dtype]
    info = model_info(checkpoint)
    weight_bytes = info["parameters"] * BYTES[args.dtype]

    bandwidths = [bandwidth(args.device, "start")]
    rounds: dict[str, dict[int, list[dict]]] = {"baseline_hf": {}, "openelm_server": {}}
    log("starting both servers")
    ours = ServerProcess.openelm(
        checkpoint, args.tokenizer, device_flags + flags, log_path=out_dir / f"{stem}-server-ours.log"
    )
    baseline_port = free_port()
    baseline_command = [
        sys.executable,
        "-m",
        "bench.baseline_hf",
        "serve",
        "--model-dir",
        str(checkpoint),
        "--tokenizer",
        args.tokenizer,
        "--port",
        str(baseline_port),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
    ]
    baseline = ServerProcess(baseline_command, baseline_port, out_dir / f"{stem}-server-baseline.log")
    profile = None
    try:
        ours.wait_ready()
        baseline.wait_ready()
        from bench.baseline_hf import llama_config_for

        _, baseline_model = llama_config_for(json.loads((checkpoint / "config.json").read_text()))
        for server in (ours, baseline):
            serve_bench.warm_up(server.url, count=2)
        progress = not args.no_progress
        for number in range(1, args.rounds + 1):
            for concurrency, count in zip(baseline_concurrencies, baseline_counts):
                log(f"round {number}/{args.rounds}: baseline, {concurrency} clients, {count} requests")
                run = serve_bench.run_one(
                    baseline.url, prompts[:count], concurrency, progress=progress, server=baseline, label="baseline_hf"
                )
                rounds["baseline_hf"].setdefault(concurrency, []).append({**run, "round": number})
                log(serve_bench.format_run(run))
            for concurrency, count in zip(concurrencies, counts):
                log(f"round {number}/{args.rounds}: ours, {concurrency} clients, {count} requests")
                run = serve_bench.run_one(
                    ours.url, prompts[:count], concurrency, progress=progress, server=ours, label="openelm_server"
                )
                rounds["openelm_server"].setdefault(concurrency, []).append({**run, "round": number})
                log(serve_bench.format_run(run))
            bandwidths.append(bandwidth(args.device, f"after round {number}"))
        if args.profile:
            baseline.stop()
            log(f"profiling our server with py-spy at {args.profile_concurrency} clients (not measured)")
            count = (
                counts[concurrencies.index(args.profile_concurrency)]
                if args.profile_concurrency in concurrencies
                else 2 * args.profile_concurrency
            )
            profile = profile_server(ours, ours.url, prompts[:count], args.profile_concurrency, out_dir, stem)
    finally:
        ours.stop()
        baseline.stop()

    from bench.bandwidth import roofline

    best_bandwidth = max(b["read_bandwidth_gb_s"] for b in bandwidths)
    roof = roofline(weight_bytes, best_bandwidth)
    # Each configuration ran once per round; the table shows its least disturbed round (the
    # best output throughput), the JSON every round.
    series = {label: [best_round(runs) for _, runs in sorted(by_c.items())] for label, by_c in rounds.items()}
    baseline_best = series["baseline_hf"][0]
    ours_by_c = {run["concurrency"]: run for run in series["openelm_server"]}
    single = {}
    for name, run in (("ours", ours_by_c.get(1)), ("baseline", baseline_best)):
        if run and run["tpot_ms"]["mean"]:
            tokens_per_s = 1000 / run["tpot_ms"]["mean"]
            single[name] = {
                "tokens_per_s": tokens_per_s,
                "fraction_of_roofline": tokens_per_s / roof["max_decode_tokens_per_s"],
            }
    per_round_16 = []
    if 16 in rounds["openelm_server"]:
        per_round_16 = [
            o["output_throughput"] / b["output_throughput"]
            for o, b in zip(rounds["openelm_server"][16], rounds["baseline_hf"][1])
        ]
    comparison = {
        "baseline_output_throughput": baseline_best["output_throughput"],
        "ours_over_baseline_output_throughput": {
            str(c): run["output_throughput"] / baseline_best["output_throughput"] for c, run in ours_by_c.items()
        },
        "ratio_at_16": ours_by_c[16]["output_throughput"] / baseline_best["output_throughput"]
        if 16 in ours_by_c
        else None,
        "ratio_at_16_per_round": per_round_16,
        "target_ratio_at_16": 6.0,
    }
    results = {
        "benchmark": "run_all",
        "command": [sys.executable, *sys.argv] if argv is None else ["bench/run_all.py", *argv],
        "date": now_iso(),
        "git": git_revision(),
        "versions": versions(),
        "machine": machine_info(),
        "device": args.device,
        "dtype": args.dtype,
        "model": info,
        "baseline_model": baseline_model,
        "servers": {"ours": ours.command, "baseline": baseline_command},
        "dataset": {
            "kind": "random-words",
            "seed": args.seed,
            "input_len_range": list(input_range),
            "output_len_range": list(output_range),
            "exact_input_lengths": True,
            "temperature": 0.0,
            "requests_per_concurrency": dict(zip(map(str, concurrencies), counts)),
            "baseline_requests_per_concurrency": dict(zip(map(str, baseline_concurrencies), baseline_counts)),
            "rounds": args.rounds,
        },
        "bandwidth": bandwidths,
        "roofline": roof,
        "single_stream": single,
        "comparison": comparison,
        "series": series,
        "rounds": {
            label: {str(c): [round_summary(r) for r in runs] for c, runs in by_c.items()}
            for label, by_c in rounds.items()
        },
        "profile": profile,
        "wall_time_s": time.monotonic() - started,
    }
    json_path = write_json(out_dir / f"{stem}.json", results)
    png_path = out_dir / f"{stem}.png"
    md_path = out_dir / f"{stem}.md"
    table = markdown(results)
    md_path.write_text(table)
    try:
        from bench.plot import plot_results

        plot_results(results, png_path)
    except ImportError as error:
        log(f"no plot ({error}); pip install -r requirements-bench.txt")
        png_path = None
    print("\n" + table)
    log(
        f"wrote {json_path}" + (f", {png_path}" if png_path else "") + f", {md_path} "
        f"in {results['wall_time_s'] / 60:.1f} min"
    )
    if args.publish:
        published = ROOT / "bench" / "published"
        published.mkdir(exist_ok=True)
        for path in (json_path, png_path, md_path):
            if path:
                shutil.copy2(path, published / path.name)
        log(f"copied to {published}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

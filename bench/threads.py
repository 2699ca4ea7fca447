"""Where the model is built, and what it costs the engine thread's decode steps.

PyTorch's CPU kernels run on OpenMP, which gives each thread that uses it a pool of workers of
its own. The server decodes on its engine thread; if the model were loaded (and its kernels
timed) on the main thread, the process would hold two pools, and with more pool threads than
cores libgomp puts idle workers to sleep after every parallel region instead of letting them
spin. This runs decode steps of one sequence on an engine thread, in a fresh process per way
of building, in turn for ``--rounds`` rounds:

- ``main``: the model built on the main thread (how the server did it before),
- ``passing``: built on a thread that has ended, as ``startup.build_engine`` does,

and prints, per way, the median step time and the engine thread's voluntary context switches
per step (the sleeps; near 0 when its worker spins).

    python -m bench.threads --model-dir /tmp/openelm-270M --rounds 3 [--onednn-linear] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

from bench.common import machine_info, now_iso, write_json

WAYS = ("main", "passing")


def measure(model_dir: str, way: str, onednn: bool, steps: int) -> dict:
    """In this process: build a one-request engine core the given way, decode on another thread."""
    import torch

    from openelm_server.engine.config import EngineConfig
    from openelm_server.engine.core import EngineCore
    from openelm_server.engine.request import Request
    from openelm_server.engine.sampling import SamplingParams
    from openelm_server.model.cpu_linear import use_linears
    from openelm_server.model.loader import load_openelm
    from openelm_server.startup import in_passing_thread

    def build() -> EngineCore:
        model = load_openelm(model_dir, show_progress=False)
        model.rope_tables(torch.device("cpu"))
        if onednn:
            use_linears(model, "onednn")
        core = EngineCore(model, EngineConfig(kv_cache_tokens=4096), torch.device("cpu"))
        prompt = list(range(1, 129))
        core.add_request(Request("warm-up", prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)))
        while core.has_work:
            core.step()
        return core

    core = build() if way == "main" else in_passing_thread(build)
    result: dict = {}

    def decode() -> None:
        core.add_request(Request("timed", list(range(1, 129)), SamplingParams(max_new_tokens=steps, ignore_eos=True)))
        core.step()  # the prompt
        times = []
        before = resource.getrusage(resource.RUSAGE_THREAD)
        while core.has_work:
            started = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_THREAD)
        result["step_ms"] = statistics.median(times) * 1e3
        result["sleeps_per_step"] = (after.ru_nvcsw - before.ru_nvcsw) / len(times)

    engine_thread = threading.Thread(target=decode)
    engine_thread.start()
    engine_thread.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per run")
    parser.add_argument("--onednn-linear", action="store_true", help="oneDNN linears (default: PyTorch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model_dir, args.child, args.onednn_linear, args.steps)))
        return 0
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for round_number in range(args.rounds):
        for way in WAYS:
            command = [sys.executable, "-m", "bench.threads", "--model-dir", args.model_dir, "--child", way]
            command += ["--steps", str(args.steps)] + (["--onednn-linear"] if args.onednn_linear else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            run = json.loads(output.strip().splitlines()[-1])
            runs[way].append(run)
            step_ms, sleeps = run["step_ms"], run["sleeps_per_step"]
            print(f"round {round_number + 1} {way:8s} {step_ms:6.1f} ms/step, {sleeps:5.1f} sleeps/step", flush=True)
    summary = {
        way: {
            "step_ms_median": statistics.median(r["step_ms"] for r in runs[way]),
            "sleeps_per_step_median": statistics.median(r["sleeps_per_step"] for r in runs[way]),
        }
        for way in WAYS
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        write_json(
            args.out,
            {
                "benchmark": "threads",
                "date": now_iso(),
                "machine": machine_info(),
                "onednn_linear": args.onednn_linear,
                "runs": runs,
                "summary": summary,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

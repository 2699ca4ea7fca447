"""Smoke tests of the benchmark tools: they run end to end on a tiny model and write what they
promise. Their numbers are never checked here (CI machines are shared and noisy); only that
the runs complete, count right and produce JSON and a plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bandwidth import measure_bandwidth, roofline
from bench.common import RequestResult, aggregate, build_prompts, load_tokenizer, percentile
from openelm_server.testing.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_prompt_set_is_deterministic_and_has_the_asked_lengths(serving_dirs):
    tokenizer = load_tokenizer(serving_dirs[1])
    prompts = build_prompts(12, (8, 40), (4, 9), seed=3, tokenizer=tokenizer)
    assert prompts == build_prompts(12, (8, 40), (4, 9), seed=3, tokenizer=tokenizer)
    assert prompts[:5] == build_prompts(5, (8, 40), (4, 9), seed=3, tokenizer=tokenizer)
    assert prompts != build_prompts(12, (8, 40), (4, 9), seed=4, tokenizer=tokenizer)
    for request in prompts:
        assert request.input_len == len(tokenizer(request.prompt).input_ids)
        assert 4 <= request.output_len <= 9


def test_prompt_lengths_are_exact_with_the_llama_tokenizer(shared_tokenizer_dir):
    tokenizer = load_tokenizer(shared_tokenizer_dir)
    prompts = build_prompts(20, (16, 64), (8, 8), seed=0, tokenizer=tokenizer)
    for request, wanted in zip(prompts, build_prompts(20, (16, 64), (8, 8), seed=0)):
        assert request.input_len == wanted.input_len  # the length drawn, met exactly


def test_metrics_of_a_run():
    results = [
        RequestResult(
            ok=True,
            prompt_tokens=10,
            output_tokens=5,
            ttft=0.1,
            latency=0.5,
            itl=[0.1] * 4,
            start=0.0,
            end=0.5,
            finish_reason="length",
        ),
        RequestResult(
            ok=True, prompt_tokens=20, output_tokens=1, ttft=0.2, latency=0.2, start=0.1, end=0.3, finish_reason="stop"
        ),
        RequestResult(ok=False, error="HTTP 503: busy", start=0.1, end=0.2),
    ]
    metrics = aggregate(results, duration=2.0)
    assert (metrics["completed"], metrics["failed"], metrics["errors"]) == (2, 1, ["HTTP 503: busy"])
    assert metrics["output_throughput"] == 3.0 and metrics["request_throughput"] == 1.0
    assert metrics["total_token_throughput"] == 18.0
    assert metrics["tpot_ms"]["count"] == 1 and math.isclose(metrics["tpot_ms"]["mean"], 100.0)
    assert math.isclose(metrics["ttft_ms"]["p50"], 150.0)
    assert metrics["stopped_early"] == 1
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


def test_bandwidth_and_roofline():
    measured = measure_bandwidth(size_mb=16, repeats=2)
    assert all(measured[kind]["best_gb_s"] > 0 for kind in ("read", "copy", "gemv"))
    roof = roofline(weight_bytes=2_000_000_000, bandwidth_gb_s=4.0)
    assert math.isclose(roof["min_step_ms"], 500.0) and math.isclose(roof["max_decode_tokens_per_s"], 2.0)


def test_cpu_linears_times_every_kernel_over_the_models_layer_shapes(tmp_path):
    from bench.cpu_linears import linear_shapes
    from openelm_server.model import cpu_extension
    from openelm_server.model.config import OpenELMConfig
    from openelm_server.testing.checkpoints import published_config

    shapes = linear_shapes(OpenELMConfig.from_dict(published_config("270M")))
    assert len(shapes) == 16 * 4 + 1 and shapes[0] == (12 * 64 + 2 * 3 * 64, 1280) and shapes[-1] == (32000, 1280)
    out = tmp_path / "linears.json"
    done = run_script(
        "-m",
        "bench.cpu_linears",
        "--layers",
        "1",
        "--rows",
        "1,3",
        "--repeats",
        "1",
        "--bandwidth-mb",
        "16",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["linear_layers"] == 5 and results["read_gb_s"] > 0 and results["matmul_peak_gflop_s"] > 0
    timings = {(row["kernel"], row["rows"]): row for row in results["timings"]}
    suffixes = {"AVX2": "", "AVX-512": "_avx512"}
    ours = tuple(
        f"{kernel}{suffixes[isa]}" for isa in cpu_extension.matmul_isas() for kernel in ("own", "int8_own", "bf16_own")
    )
    kernels = ("onednn", "pytorch", "int8") + ours
    assert set(timings) == {(k, r) for k in kernels for r in (1, 3)}
    assert all(row["ms"] > 0 and row["weights_gb_s"] > 0 for row in timings.values())
    if ours:  # GB/s counts each kernel's own bytes per weight: int8 1, bfloat16 2, float32 4
        for kernel, size in (("int8_own", 1), ("bf16_own", 2), ("own", 4)):
            row = timings[(kernel, 1)]
            assert row["weights_gb_s"] == pytest.approx(results["parameters"] * size / row["ms"] * 1e-6)


def test_make_checkpoint_writes_a_loadable_published_layout(tmp_path):
    from openelm_server.model.loader import load_openelm

    out = tmp_path / "openelm-small"
    args = [
        "-m",
        "bench.make_checkpoint",
        "--size",
        "270M",
        "--layers",
        "3",
        "--vocab-size",
        "320",
        "--config-json",
        '{"model_dim": 64, "head_dim": 16}',
        "--dtype",
        "float32",
        "--out",
        str(out),
    ]
    made = run_script(*args, "--max-shard-gb", "0.0003")
    assert made.returncode == 0, made.stderr
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-0000*.safetensors"))) > 1
    model = load_openelm(out, show_progress=False)
    assert model.config.num_layers == 3 and model.config.model_dim == 64
    again = run_script(*args)
    assert again.returncode == 2 and "--force" in again.stderr


def test_the_baseline_matches_the_openelm_size():
    from bench.baseline_hf import llama_config_for
    from openelm_server.testing.checkpoints import published_config

    for size in ("270M", "3B"):
        _, description = llama_config_for(published_config(size))
        assert abs(description["parameter_ratio"] - 1) < 0.01, description


def test_serve_bench_against_our_server_writes_json_and_plot(serving_dirs, tmp_path):
    model_dir, tokenizer_dir = serving_dirs
    out = tmp_path / "results.json"
    run = run_script(
        "-m",
        "bench.serve_bench",
        "--launch",
        str(model_dir),
        "--tokenizer",
        str(tokenizer_dir),
        "--server-flags",
        "--max-batch-size 4 --max-model-len 256",
        "--concurrency",
        "1,3",
        "--num-requests",
        "2,5",
        "--input-len",
        "8:24",
        "--output-len",
        "4:10",
        "--out",
        str(out),
        "--no-progress",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    runs = results["series"]["openelm_server"]
    assert [(r["concurrency"], r["completed"], r["failed"]) for r in runs] == [(1, 2, 0), (3, 5, 0)]
    for r in runs:
        assert r["total_output_tokens"] > 0 and r["output_throughput"] > 0
        assert r["ttft_ms"]["p50"] > 0 and r["e2el_ms"]["p99"] >= r["e2el_ms"]["p50"]
    assert results["model"]["parameters"] > 0 and results["versions"]["torch"]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_the_baseline_server_answers_like_ours(serving_dirs, tmp_path):
    """The tutorial's way (transformers generate, one at a time) behind the same HTTP
    interface, so the same client measures both."""
    model_dir, tokenizer_dir = serving_dirs

    port = free_port()
    baseline = ServerProcess(
        [
            sys.executable,
            "-m",
            "bench.baseline_hf",
            "serve",
            "--model-dir",
            str(model_dir),
            "--tokenizer",
            str(tokenizer_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        port,
        tmp_path / "baseline.log",
    )
    with baseline:
        baseline.wait_ready(180)
        out = tmp_path / "baseline.json"
        run = run_script(
            "-m",
            "bench.serve_bench",
            "--url",
            baseline.url,
            "--tokenizer",
            str(tokenizer_dir),
            "--concurrency",
            "1",
            "--num-requests",
            "2",
            "--input-len",
            "8:16",
            "--output-len",
            "5:5",
            "--label",
            "baseline_hf",
            "--out",
            str(out),
            "--no-progress",
            "--no-plot",
        )
        assert run.returncode == 0, run.stdout + run.stderr
    [result] = json.loads(out.read_text())["series"]["baseline_hf"]
    assert result["completed"] == 2 and result["total_output_tokens"] == 10  # min_new_tokens: exact lengths


def test_serve_bench_refuses_contradictory_arguments():
    run = run_script("-m", "bench.serve_bench", "--url", "http://127.0.0.1:9", "--launch", "x")
    assert run.returncode == 2 and "exactly one of --url and --launch" in run.stderr


def test_soak_runs_and_reports(serving_dirs, tmp_path):
    model_dir, tokenizer_dir = serving_dirs
    out = tmp_path / "soak.json"
    run = run_script(
        "-m",
        "bench.soak",
        "--launch",
        str(model_dir),
        "--tokenizer",
        str(tokenizer_dir),
        "--duration",
        "8",
        "--concurrency",
        "4",
        "--warmup",
        "1",
        "--sample-interval",
        "1",
        "--max-tokens",
        "4:12",
        "--prompt-words",
        "2:20",
        "--out",
        str(out),
        "--no-progress",
        "--",
        "--max-batch-size",
        "4",
        "--max-model-len",
        "256",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["requests"] > 10 and summary["unexpected"] == 0, summary
    assert report["drained_after_s"] is not None and report["healthy_after"]
    assert report["server_stop"]["exit_status"] == 0
    assert report["samples"] and report["samples"][-1]["rss_mb"] > 0


def test_run_all_compares_both_servers_side_by_side(serving_dirs, tmp_path):
    model_dir, tokenizer_dir = serving_dirs
    before = sorted(p.name for p in model_dir.iterdir())
    run = run_script(
        "-m",
        "bench.run_all",
        "--checkpoint",
        str(model_dir),
        "--tokenizer",
        str(tokenizer_dir),
        "--concurrency",
        "1,2",
        "--num-requests",
        "2,3",
        "--baseline-concurrency",
        "1,2",
        "--baseline-requests",
        "2",
        "--rounds",
        "1",
        "--input-len",
        "8:16",
        "--output-len",
        "4:6",
        "--out-dir",
        str(tmp_path),
        "--name",
        "smoke",
        "--no-progress",
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in model_dir.iterdir()) == before  # a given checkpoint is never rewritten
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["concurrency"] for r in results["series"]["baseline_hf"]] == [1, 2]
    assert [r["concurrency"] for r in results["series"]["openelm_server"]] == [1, 2]
    assert all(r["failed"] == 0 for runs in results["series"].values() for r in runs)
    assert results["roofline"]["max_decode_tokens_per_s"] > 0 and results["bandwidth"]
    assert set(results["comparison"]["ours_over_baseline_output_throughput"]) == {"1", "2"}
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("| baseline (HF generate) |") == 2 and table.count("| ours (api.py) |") == 2
    assert (tmp_path / "smoke.png").stat().st_size > 10_000

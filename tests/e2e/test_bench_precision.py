"""bench/precision.py on the tiny fixture: servers in turn, one stream each, memory from /proc."""

from __future__ import annotations

import json

import pytest

from bench import precision


# Server starts take minutes on 2 busy cores; bfloat16 and int8 skip float32's start-up kernel timing.
@pytest.mark.timeout(600)
def test_precision_bench_runs_each_precision_in_turn_and_reports_memory(serving_dirs, tmp_path):
    model_dir, tokenizer_dir = serving_dirs
    out = tmp_path / "precision.json"
    argv = ["--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--precisions", "int8,bfloat16"]
    argv += ["--rounds", "1", "--requests", "1", "--output-len", "4:4", "--out", str(out), "--no-progress"]
    assert precision.main(argv) == 0
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert [(r["round"], r["precision"]) for r in runs] == [(0, "int8"), (0, "bfloat16")]
    for run in runs:
        assert run["decode_tokens_per_s"] > 0
        assert 0 < run["rss_after_load_mb"] <= run["peak_rss_mb"]
        assert run["load_average_before"] is not None
    assert all("int8 with per-channel scales" in r["linear_kernels"] for r in runs if r["precision"] == "int8")
    assert results["table"].startswith("| precision | decode tok/s, median |")
    assert "| int8 |" in results["table"]

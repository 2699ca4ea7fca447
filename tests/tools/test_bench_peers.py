"""The GPU check and the llama.cpp comparison: what can be checked without a GPU or a llama.cpp
build. Both run for real where those exist (BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.make_checkpoint import build_config
from bench.peers.llama_cpp import published_layout
from openelm_server.model.config import OpenELMConfig, make_divisible

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", ["270M", "3B"])
def test_llama_cpp_gets_the_per_layer_config_that_gives_our_shapes(size):
    compact = build_config(size)
    expanded = published_layout(compact)
    ours = OpenELMConfig.from_dict(compact)
    assert expanded["architectures"] == ["OpenELMForCausalLM"]
    assert expanded["num_query_heads"] == list(ours.num_query_heads)
    assert expanded["num_kv_heads"] == list(ours.num_kv_heads)
    # llama.cpp's converter derives each layer's FFN width with the published rounding rule
    widths = [make_divisible(m * ours.model_dim, expanded["ffn_dim_divisor"]) for m in expanded["ffn_multipliers"]]
    assert widths == list(ours.ffn_dims)
    assert OpenELMConfig.from_dict(expanded) == ours


def test_a_published_config_keeps_its_shapes(shared_model_dir):
    raw = json.loads((shared_model_dir / "config.json").read_text())
    assert OpenELMConfig.from_dict(published_layout(raw)) == OpenELMConfig.from_dict(raw)


def test_cuda_check_says_it_needs_cuda_on_a_machine_without_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/cuda_check.py runs for real there")
    done = subprocess.run(
        [sys.executable, "-m", "bench.cuda_check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr

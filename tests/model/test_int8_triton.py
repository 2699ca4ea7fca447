"""The CUDA int8 kernel (openelm_server/model/int8_triton.py), run by Triton's interpreter on the
CPU: masks, strides, block sizes and the scales, against a float64 product. Its speed and its
compiled form are checked on a GPU by bench/cuda_check.py. Skipped where Triton is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child process: TRITON_INTERPRET must be set before Triton reads its kernels.
SCRIPT = r"""
import json, sys
import triton.runtime.interpreter as interpreter

# Triton 3.6's interpreter turns a scalar (a 1-element array there) into an index with int(),
# which NumPy 2.4 refuses for arrays of one dimension; the loop bound over in_features needs it.
_patch = interpreter._patch_lang_tensor
def _patch_with_index(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = _patch_with_index

import torch
from openelm_server.model.int8_triton import KernelConfig, config_for, int8_weight_matmul
from openelm_server.model.quantize import Int8Linear

generator = torch.Generator().manual_seed(0)
found = []
for rows, out_features, in_features, dtype, cut in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    layer = Int8Linear.quantize(torch.randn(out_features, in_features, generator=generator), "test")
    layer.use_cpu_kernel("pytorch")  # the plain weight layout, as on CUDA
    scales = layer.scales.float()
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    config = KernelConfig(*cut) if cut else None
    y = int8_weight_matmul(x, layer.weight, scales, config)
    want = x.double() @ (layer.weight.double() * scales.double()[:, None]).T
    found.append({
        "shape": list(y.shape), "dtype": str(y.dtype).removeprefix("torch."),
        "error": float((y.double() - want).norm() / want.norm()),
    })
print(json.dumps(found))
"""

CASES = [
    # rows, out_features, in_features, activations, cut (None: the default one)
    (1, 48, 64, "float32", None),  # one decode row, one block of everything
    (3, 100, 160, "bfloat16", None),  # columns and depth not multiples of the blocks
    (17, 5000, 96, "float32", None),  # rows past one block of 16, wide enough for blocks of 32 columns
    (70, 33, 272, "bfloat16", None),  # rows past the largest block (64)
    (5, 40, 400, "float32", (16, 16, 64, 3)),  # inputs split 3 ways (7 steps of 64: 3 + 3 + 1)
    (2, 24, 208, "bfloat16", (16, 16, 32, 8)),  # 8 parts asked of 7 steps of 32: 7 made
]


def test_the_kernel_equals_the_dequantized_product():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for (rows, out_features, _, dtype, _), result in zip(CASES, found):
        assert result["shape"] == [rows, out_features]
        assert result["dtype"] == dtype
        # float32 multiplies in IEEE float32; bfloat16 output rounds once (2^-9 relative).
        assert result["error"] < (1e-6 if dtype == "float32" else 5e-3), result


def test_the_default_cut_covers_narrow_layers_with_many_blocks():
    from openelm_server.model.int8_triton import config_for

    # 3072 output columns (the 3B's out and down projections) make 192 column blocks.
    assert 3072 // config_for(1, 3072, 12288).block_n >= 132  # an H100/H200 has 132 multiprocessors
    assert config_for(1, 24576, 3072).block_m == 16 and config_for(40, 24576, 3072).block_m == 64
    assert config_for(200, 3072, 3072).block_m == 64

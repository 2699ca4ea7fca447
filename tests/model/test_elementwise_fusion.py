"""Fusing the element-wise kernels (on CUDA, at start-up): every layer goes through the fused
functions, switching back restores the plain ones, and a machine where torch.compile cannot run
keeps serving with the plain functions and says so. What the fused kernels compute on a GPU is
checked by bench/cuda_check.py, which needs one."""

from __future__ import annotations

import logging
from collections import Counter

import torch

from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM, fuse_elementwise
from openelm_server.startup import compile_elementwise


@torch.inference_mode()
def last_logits(model: OpenELM) -> torch.Tensor:
    prompt = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 6, 10, 14, 18, 22]])
    cache = model.new_kv_cache(2, prompt.shape[1])
    positions = torch.arange(prompt.shape[1]).expand_as(prompt)
    return model.logits(model(prompt, ForwardBatch.build(cache, [0, 1], positions))[:, -1])


def test_every_layer_uses_the_fused_functions_until_switched_back(own_model_dir, monkeypatch):
    calls: Counter[str] = Counter()

    def counting_compile(function, dynamic):
        assert dynamic  # one compilation for every batch size and length

        def counted(*args):
            calls[function.__name__] += 1
            return function(*args)

        return counted

    monkeypatch.setattr(torch, "compile", counting_compile)
    model = load_openelm(own_model_dir, dtype=torch.float32)
    plain = last_logits(model)
    fuse_elementwise(True)
    try:
        fused = last_logits(model)
    finally:
        fuse_elementwise(False)
    layers = model.config.num_layers
    # per layer: attention and FFN norms; q and k normed and rotated together; SwiGLU; the final norm
    assert calls == {"rms_norm": 2 * layers + 1, "norm_and_rotate": layers, "silu_and_mul": layers}
    assert torch.equal(fused, plain)
    calls.clear()
    last_logits(model)
    assert not calls


def test_a_machine_where_compile_fails_keeps_the_plain_kernels(own_model_dir, monkeypatch, caplog):
    def compile_without_triton(function, dynamic):
        def fail(*args):
            raise RuntimeError("Cannot find a working triton installation")

        return fail

    monkeypatch.setattr(torch, "compile", compile_without_triton)
    model = load_openelm(own_model_dir, dtype=torch.float32)
    expected = last_logits(model)
    with caplog.at_level(logging.WARNING, logger="openelm_server.startup"):
        compile_elementwise(model)
    assert "Cannot find a working triton installation" in caplog.text
    assert "--no-compile" in caplog.text
    assert torch.equal(last_logits(model), expected)

"""--dtype bfloat16 on the CPU: it serves, and start-up warns where the CPU has no bfloat16
instructions and the model runs in bfloat16 throughout (there PyTorch converts every operand to
float32 and back, slower than float32); where our kernels build it keeps bfloat16 weights in
them instead (tests/model/test_bfloat16_weights.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from in_process import InProcessServer

from openelm_server.config import Settings
from openelm_server.model.cpu_linear import PanelLinear
from openelm_server.startup import cpu_flags, keeps_bfloat16_weights, warn_if_slow_bfloat16

CPU = torch.device("cpu")


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_slow_bfloat16(torch.bfloat16, CPU, {"avx2", "fma", "f16c"})
    (message,) = warnings(caplog)
    assert message.startswith("--dtype bfloat16 on a CPU without bfloat16 instructions")
    assert "--dtype float32 or --quantization int8" in message


@pytest.mark.parametrize(
    "dtype, device, flags",
    [
        (torch.bfloat16, CPU, {"avx2", "avx512f", "avx512_bf16"}),  # Intel Cooper Lake and later, AMD Zen 4
        (torch.bfloat16, CPU, {"avx2", "amx_bf16", "amx_tile"}),  # Intel Sapphire Rapids
        (torch.bfloat16, CPU, {"fp", "asimd", "bf16"}),  # Arm v8.6 (Graviton 3)
        (torch.float32, CPU, {"avx2"}),
        (torch.bfloat16, torch.device("cuda"), {"avx2"}),
        (torch.bfloat16, CPU, None),  # no /proc/cpuinfo: nothing known, nothing said
    ],
)
def test_no_warning_where_bfloat16_is_native_or_not_chosen(caplog, dtype, device, flags):
    with caplog.at_level(logging.WARNING):
        warn_if_slow_bfloat16(dtype, device, flags)
    assert warnings(caplog) == []


def test_this_machines_flags_are_read():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here")
    assert flags and all(" " not in flag for flag in flags)


@pytest.mark.parametrize("cpu_linear", ["auto", "pytorch"])
def test_bfloat16_serves_on_the_cpu(shared_model_dir, shared_tokenizer_dir, cpu_linear):
    server = InProcessServer(shared_model_dir, shared_tokenizer_dir, dtype="bfloat16", cpu_linear=cpu_linear)
    try:
        model = server.engine.model
        settings = Settings(dtype="bfloat16", cpu_linear=cpu_linear)
        # Ours without timing where the CPU has no bfloat16 instructions; where it has, by timing.
        ours = isinstance(model.transformer.layers[0].attn.qkv_proj, PanelLinear)
        assert ours >= keeps_bfloat16_weights(settings, CPU, torch.bfloat16, cpu_flags())
        assert not (ours and cpu_linear == "pytorch")
        # The checkpoint's bfloat16 weights either way; around them float32 where ours hold them.
        assert model.transformer.token_embeddings.weight.dtype == (torch.float32 if ours else torch.bfloat16)
        assert model.transformer.layers[0].attn.qkv_proj.weight.dtype == torch.bfloat16
        answer = server.post_ok("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})
        assert answer["usage"]["completion_tokens"] == 6
    finally:
        server.close()

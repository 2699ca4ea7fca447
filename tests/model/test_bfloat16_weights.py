"""--dtype bfloat16 on a CPU without bfloat16 instructions: the linear layers keep the checkpoint's
bfloat16 weights in our kernel, everything else is float32 (cpu_linear.use_bfloat16_weights).
The shared checkpoint is stored in bfloat16, as Apple's are, so the weights are exact and the
answers are float32's: the reference holds, where bfloat16 throughout drifts from it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from openelm_server.config import Settings
from openelm_server.model import cpu_extension
from openelm_server.model.cpu_linear import PanelLinear, use_bfloat16_weights, use_plain_linears
from openelm_server.model.loader import load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.startup import build_engine, keeps_bfloat16_weights

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="our CPU kernels do not build here (see the log)")

CPU = torch.device("cpu")


@torch.inference_mode()
def greedy(model: OpenELM, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation decoded with the KV cache, and the logits after the prompt."""
    cache = model.new_kv_cache(1, len(prompt) + new_tokens)
    tokens = torch.tensor([prompt])
    logits = model.logits(model(tokens, ForwardBatch.build(cache, [0], torch.arange(len(prompt)).unsqueeze(0))))
    first = logits[0, -1].float()
    output = [int(first.argmax())]
    for _ in range(new_tokens - 1):
        position = torch.tensor([[len(prompt) + len(output) - 1]])
        step = model(torch.tensor([[output[-1]]]), ForwardBatch.build(cache, [0], position))
        output.append(int(model.logits(step)[0, -1].argmax()))
    return output, first


def test_the_reference_holds_with_bfloat16_weights_in_our_kernel(shared_model_dir):
    reference = json.loads((shared_model_dir / "reference.json").read_text())
    model = load_openelm(shared_model_dir, dtype=torch.bfloat16)
    use_bfloat16_weights(model)
    layers = [m for m in model.modules() if isinstance(m, PanelLinear)]
    assert layers and all(layer.weight.dtype == torch.bfloat16 for layer in layers)
    assert isinstance(model.lm_head, PanelLinear)  # the tied logits: their own bfloat16 copy
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.new_paged_kv_cache(4).keys[0].dtype == torch.float32
    throughout = load_openelm(shared_model_dir, dtype=torch.bfloat16)
    for case in reference["cases"]:
        output, logits = greedy(model, case["prompt_ids"], reference["new_tokens"])
        assert output == case["greedy_ids"]
        assert torch.allclose(logits[:16], torch.tensor(case["last_logits_head"]), atol=1e-4)
        _, drifting = greedy(throughout, case["prompt_ids"], 1)
        head = torch.tensor(case["last_logits_head"])
        assert (logits[:16] - head).abs().max() < (drifting[:16] - head).abs().max()


def test_plain_layers_come_back_as_float32(shared_model_dir):
    model = load_openelm(shared_model_dir, dtype=torch.bfloat16)
    use_bfloat16_weights(model)
    prompt = [1, 450, 4996, 17354]
    _, expected = greedy(model, prompt, 1)
    use_plain_linears(model)
    assert model.lm_head is None and model.transformer.layers[0].ffn.proj_1.weight.dtype == torch.float32
    _, plain = greedy(model, prompt, 1)
    assert torch.allclose(plain, expected, atol=1e-4)


@pytest.mark.parametrize(
    "fields, flags, keeps",
    [
        ({}, {"avx2", "fma"}, True),  # no bfloat16 instructions: ours
        ({}, {"avx2", "avx512_bf16"}, False),  # native bfloat16: timed as before
        ({}, {"amx_bf16"}, False),
        ({"cpu_linear": "own"}, {"amx_bf16"}, True),  # asked for
        ({"cpu_linear": "pytorch"}, {"avx2"}, False),  # bfloat16 throughout, asked for
        ({"cpu_linear": "onednn"}, {"avx2"}, False),
        ({"quantization": "int8"}, {"avx2"}, False),  # int8 layers instead
        ({}, None, False),  # flags unknown: as before
    ],
)
def test_when_bfloat16_weights_go_to_our_kernel(fields, flags, keeps):
    assert keeps_bfloat16_weights(Settings(dtype="bfloat16", **fields), CPU, torch.bfloat16, flags) is keeps
    assert not keeps_bfloat16_weights(Settings(**fields), CPU, torch.float32, flags)


def test_a_server_with_bfloat16_weights_in_our_kernel_says_so(shared_model_dir, shared_tokenizer_dir, caplog):
    settings = Settings(
        model_path=str(shared_model_dir),
        tokenizer_path=str(shared_tokenizer_dir),
        device="cpu",
        dtype="bfloat16",
        cpu_linear="own",
        max_batch_size=2,
        max_model_len=64,
    )
    with caplog.at_level(logging.INFO, logger="openelm_server.startup"):
        engine, _ = build_engine(settings)
    assert "linear layers keep their bfloat16 weights for our CPU kernel" in caplog.text
    assert engine.core.kv_cache.keys[0].dtype == torch.float32
    assert engine.core.kv_cache.attends_in_place

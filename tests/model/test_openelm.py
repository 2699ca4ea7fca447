"""The OpenELM module: exact against the reference, cache-consistent, batch-consistent, in
float32, bfloat16 and with oneDNN linears. (What the loader refuses: test_loader.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from openelm_server.model import cpu_extension
from openelm_server.model.config import OpenELMConfig
from openelm_server.model.cpu_linear import OneDnnLinear, PanelLinear, kernels_that_run, use_linears
from openelm_server.model.loader import count_parameters, load_openelm
from openelm_server.model.openelm import ForwardBatch, OpenELM
from openelm_server.testing.checkpoints import published_config, write_tiny_checkpoint
from openelm_server.tokenizer import load_tokenizer


def prefill_logits(model: OpenELM, prompts: list[list[int]], cache, slots: list[int]) -> torch.Tensor:
    """Last-position logits of each prompt, prefilled together (right-padded)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    positions = torch.arange(longest).expand(len(prompts), longest)
    hidden = model(tokens, ForwardBatch.build(cache, slots, positions))
    last = hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
    return model.logits(last)


def decode_logits(model: OpenELM, tokens: list[int], positions: list[int], cache, slots: list[int]) -> torch.Tensor:
    step = ForwardBatch.build(cache, slots, torch.tensor(positions).unsqueeze(1))
    return model.logits(model(torch.tensor(tokens).unsqueeze(1), step)[:, -1])


@torch.inference_mode()
def greedy_batch(model: OpenELM, prompts: list[list[int]], new_tokens: int, slots: list[int] | None = None):
    """Greedy continuations of several prompts decoded together with the KV cache, and the
    logits at each prompt's last position."""
    slots = slots or list(range(len(prompts)))
    cache = model.new_kv_cache(max(slots) + 1, max(len(p) for p in prompts) + new_tokens)
    first_logits = prefill_logits(model, prompts, cache, slots)
    outputs = [[int(t)] for t in first_logits.argmax(-1)]
    for _ in range(new_tokens - 1):
        positions = [len(p) + len(o) - 1 for p, o in zip(prompts, outputs)]
        logits = decode_logits(model, [o[-1] for o in outputs], positions, cache, slots)
        for output, token in zip(outputs, logits.argmax(-1).tolist()):
            output.append(token)
    return outputs, first_logits


@torch.inference_mode()
def full_recompute_logits(model: OpenELM, sequence: list[int]) -> torch.Tensor:
    cache = model.new_kv_cache(1, len(sequence))
    return prefill_logits(model, [sequence], cache, [0])[0]


@pytest.fixture(scope="module")
def reference(shared_model_dir):
    return json.loads((shared_model_dir / "reference.json").read_text())


def with_kernel(model: OpenELM, kernel: str) -> OpenELM:
    if kernel not in kernels_that_run(model):
        pytest.skip(f"the {kernel} linear kernel does not run here")
    use_linears(model, kernel)
    return model


@pytest.fixture(scope="module", params=["pytorch", "onednn", "own"])
def shared_model(request, shared_model_dir) -> OpenELM:
    """The reference must hold for every float32 linear kernel the server may choose on the CPU."""
    return with_kernel(load_openelm(shared_model_dir, dtype=torch.float32), request.param)


def test_reproduces_reference_one_prompt_at_a_time(shared_model, reference):
    for case in reference["cases"]:
        outputs, logits = greedy_batch(shared_model, [case["prompt_ids"]], reference["new_tokens"])
        assert outputs[0] == case["greedy_ids"]
        assert torch.allclose(logits[0, :16], torch.tensor(case["last_logits_head"]), atol=1e-4)
        assert int(logits[0].argmax()) == case["last_logits_argmax"]
        assert math.isclose(float(logits[0].logsumexp(-1)), case["last_logits_logsumexp"], abs_tol=1e-4)


def test_reproduces_reference_batched_in_scattered_slots(shared_model, reference):
    cases = reference["cases"]
    outputs, logits = greedy_batch(
        shared_model, [c["prompt_ids"] for c in cases], reference["new_tokens"], slots=[5, 1, 3, 0]
    )
    for case, output, row in zip(cases, outputs, logits):
        assert output == case["greedy_ids"]
        assert torch.allclose(row[:16], torch.tensor(case["last_logits_head"]), atol=1e-4)


def test_reproduces_reference_with_decode_attention_gathered_for_sdpa(shared_model_dir, reference, monkeypatch):
    """Where our CPU kernels do not build (and on CUDA, or in bfloat16), decode rows gather their
    blocks for SDPA as prompts do: the reference holds that way too."""
    monkeypatch.setattr(cpu_extension, "available", lambda: False)
    model = load_openelm(shared_model_dir, dtype=torch.float32)
    assert not model.new_kv_cache(1, 16).attends_in_place
    cases = reference["cases"]
    outputs, logits = greedy_batch(model, [c["prompt_ids"] for c in cases], reference["new_tokens"], slots=[2, 0, 3, 1])
    for case, output, row in zip(cases, outputs, logits):
        assert output == case["greedy_ids"]
        assert torch.allclose(row[:16], torch.tensor(case["last_logits_head"]), atol=1e-4)


def test_reference_with_the_real_tokenizer(shared_tokenizer_dir, reference):
    tokenizer = load_tokenizer(shared_tokenizer_dir)
    assert tokenizer("Once upon a time there was").input_ids == reference["cases"][0]["prompt_ids"]
    assert tokenizer("你好，请介绍一下你自己。").input_ids == reference["cases"][1]["prompt_ids"]


@pytest.fixture(scope="module")
def own_model(own_model_dir) -> OpenELM:
    return load_openelm(own_model_dir, dtype=torch.float32)


def test_self_made_config_has_varied_heads_and_gqa(own_model):
    config = own_model.config
    assert len(set(config.num_query_heads)) > 1
    assert all(q > kv for q, kv in zip(config.num_query_heads, config.num_kv_heads))


def test_cached_decoding_equals_full_recomputation(own_model):
    prompt = [1, 17, 42, 99, 7, 3, 250]
    outputs, _ = greedy_batch(own_model, [prompt], 12)
    sequence = prompt + outputs[0]
    cache = own_model.new_kv_cache(1, len(sequence))
    with torch.inference_mode():
        prefill_logits(own_model, [prompt], cache, [0])
        for position in range(len(prompt), len(sequence)):
            cached = decode_logits(own_model, [sequence[position]], [position], cache, [0])[0]
            recomputed = full_recompute_logits(own_model, sequence[: position + 1])
            assert torch.allclose(cached, recomputed, atol=1e-4), position


def test_batched_equals_alone_at_different_positions(own_model):
    prompts = [[1, 5, 9], [1] + list(range(30, 70)), [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209]]
    together, together_logits = greedy_batch(own_model, prompts, 10, slots=[2, 0, 1])
    for prompt, output, logits in zip(prompts, together, together_logits):
        alone, alone_logits = greedy_batch(own_model, [prompt], 10)
        assert output == alone[0]
        assert torch.allclose(logits, alone_logits[0], atol=1e-4)


def test_sharded_loading_equals_single_file(tmp_path, own_model_dir, own_model):
    vocab = own_model.config.vocab_size
    single = write_tiny_checkpoint(tmp_path / "single", vocab_size=vocab, seed=3)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", vocab_size=vocab, seed=3, max_shard_bytes=200_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    a = load_openelm(single, show_progress=False).state_dict()
    b = load_openelm(sharded, show_progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_published_3b_config_has_exactly_its_parameter_count():
    config = OpenELMConfig.from_dict(published_config("3B"))
    with torch.device("meta"):
        model = OpenELM(config)
    assert count_parameters(model) == 3_036_647_424
    assert config.num_layers == 36 and config.head_dim == 128


def test_published_270m_per_layer_heads():
    config = OpenELMConfig.from_dict(published_config("270M"))
    assert config.num_query_heads == (12,) * 5 + (16,) * 7 + (20,) * 4
    assert config.num_kv_heads == tuple(q // 4 for q in config.num_query_heads)


def test_expanded_lists_in_config_json_are_used_as_published(shared_model_dir):
    raw = json.loads((shared_model_dir / "config.json").read_text())
    config = OpenELMConfig.from_dict(raw)
    assert config.num_query_heads == tuple(raw["num_query_heads"])
    assert config.ffn_dims == (256, 512, 768, 1024)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ffn_with_glu=False),
        dict(normalize_qk_projections=False),
        dict(share_input_output_layers=False),
    ],
)
def test_config_variants_load_and_run(tmp_path, overrides):
    directory = write_tiny_checkpoint(tmp_path / "variant", vocab_size=64, **overrides)
    model = load_openelm(directory)
    outputs, _ = greedy_batch(model, [[1, 2, 3]], 3)
    assert len(outputs[0]) == 3


def test_bfloat16_on_cpu_is_close_to_float32(own_model_dir, own_model):
    model_bf16 = load_openelm(own_model_dir, dtype=torch.bfloat16)
    prompt = [1, 17, 42, 99, 7, 3, 250, 11, 12]
    with torch.inference_mode():
        logits_fp32 = full_recompute_logits(own_model, prompt)
        logits_bf16 = full_recompute_logits(model_bf16, prompt).float()
    difference = (logits_fp32 - logits_bf16).abs().max().item()
    print(
        f"bf16 vs fp32 last-position logits: max |diff| {difference:.4f} "
        f"(logit range {logits_fp32.min():.2f}..{logits_fp32.max():.2f})"
    )
    assert difference < 0.1 * logits_fp32.abs().max().item()
    assert torch.topk(logits_bf16, 5).indices[0] in torch.topk(logits_fp32, 5).indices


@pytest.mark.parametrize("kernel", ["onednn", "own"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "own-lm-head"])
def test_cpu_linear_kernels_match_pytorch_and_keep_the_cache_consistent(tmp_path, own_tokenizer_dir, tied, kernel):
    # vocab 400 is no multiple of our kernel's 16-output panels: the last panel is part padding.
    directory = write_tiny_checkpoint(tmp_path / "model", vocab_size=400, share_input_output_layers=tied)
    plain = load_openelm(directory, dtype=torch.float32)
    fast = with_kernel(load_openelm(directory, dtype=torch.float32), kernel)
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert isinstance(fast.lm_head, {"onednn": OneDnnLinear, "own": PanelLinear}[kernel])
    prompts = [[1, 17, 42, 99, 7], [1, 250, 11], [1, 3, 5, 7, 9, 11, 13]]
    plain_outputs, plain_logits = greedy_batch(plain, prompts, 12)
    fast_outputs, fast_logits = greedy_batch(fast, prompts, 12, slots=[2, 0, 1])
    assert fast_outputs == plain_outputs
    assert torch.allclose(fast_logits, plain_logits, atol=1e-4)
    sequence = prompts[0] + fast_outputs[0]
    alone, _ = greedy_batch(fast, [prompts[0]], 12)
    assert alone[0] == fast_outputs[0]
    assert torch.allclose(
        full_recompute_logits(fast, sequence[:-1]), full_recompute_logits(plain, sequence[:-1]), atol=1e-4
    )


# ---- what the loader refuses, and how it says so --------------------------------------------

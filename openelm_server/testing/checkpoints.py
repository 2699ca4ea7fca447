"""Random-weight OpenELM checkpoints in the published layout, and a SentencePiece tokenizer trained on
the spot: for the tests, the benchmarks and ``python api.py --demo``, which cannot download the real ones.

The tokenizer is trained on a few lines of text with byte fallback, like Llama-2's, so any text
(Chinese included) round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from openelm_server.model.config import OpenELMConfig
from openelm_server.model.loader import SHARD_INDEX, SINGLE_FILE, expected_tensor_shapes

TRAINING_TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "你好，请介绍一下你自己。我是一个语言模型。",
    "Hello world! How are you today? I am fine, thank you.",
]

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "tokenizer_class": "LlamaTokenizer",
    "sp_model_kwargs": {},
}


def tiny_config(vocab_size: int, **overrides) -> dict:
    """A small OpenELM config as the published config code would write it: layers with
    different head counts and GQA."""
    config = dict(
        model_type="openelm",
        vocab_size=vocab_size,
        model_dim=128,
        head_dim=16,
        num_transformer_layers=3,
        num_gqa_groups=2,
        qkv_multipliers=[0.5, 1.0],
        ffn_multipliers=[0.5, 2.0],
        ffn_dim_divisor=64,
        ffn_with_glu=True,
        normalize_qk_projections=True,
        share_input_output_layers=True,
        rope_freq_constant=10000,
        max_context_length=256,
        bos_token_id=1,
        eos_token_id=2,
        activation_fn_name="swish",
        normalization_layer_name="rms_norm",
    )
    config.update(overrides)
    return config


def train_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 40),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return directory


def write_tiny_checkpoint(
    directory: Path,
    vocab_size: int,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    quiet_eos: bool = False,
    **overrides,
) -> Path:
    """With ``quiet_eos`` the EOS embedding row is zero, so its tied logit is always 0 while the
    best of the other random logits is above 0: greedy answers run to their full length
    instead of stopping at once."""
    raw = tiny_config(vocab_size, **overrides)
    tensors = random_state_dict(OpenELMConfig.from_dict(raw), seed=seed, std=0.08)
    if quiet_eos:
        tensors["transformer.token_embeddings.weight"][raw["eos_token_id"]] = 0
    write_checkpoint(directory, raw, tensors, max_shard_bytes=max_shard_bytes)
    return directory


def random_state_dict(
    config: OpenELMConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random weights with the published names and shapes (norm weights near 1), for tests
    and benchmarks that cannot download the real ones."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = std * torch.randn(shape, generator=generator)
        tensors[name] = tensor.to(dtype)
    return tensors


def write_checkpoint(
    model_dir: str | Path, raw_config: dict, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None
) -> None:
    """Save in the published layout: config.json, generation_config.json, and
    model.safetensors, or numbered shards with model.safetensors.index.json."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(raw_config, indent=2))
    (model_dir / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": raw_config.get("bos_token_id", 1), "eos_token_id": raw_config.get("eos_token_id", 2)},
            indent=2,
        )
    )
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], str(model_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (model_dir / SHARD_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def published_config(size: str, vocab_size: int = 32000) -> dict:
    """The compact form of Apple's published configs; from_dict derives the per-layer lists."""
    shapes = {
        "270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
        "450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
        "1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
        "3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
    }
    return dict(
        model_type="openelm",
        vocab_size=vocab_size,
        num_gqa_groups=4,
        qkv_multipliers=[0.5, 1.0],
        ffn_multipliers=[0.5, 4.0],
        ffn_dim_divisor=256,
        ffn_with_glu=True,
        normalize_qk_projections=True,
        share_input_output_layers=True,
        rope_freq_constant=10000,
        max_context_length=2048,
        activation_fn_name="swish",
        normalization_layer_name="rms_norm",
        bos_token_id=1,
        eos_token_id=2,
        **shapes[size],
    )

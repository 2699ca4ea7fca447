"""A tiny random-weight OpenELM and a SentencePiece tokenizer, made on the spot.

``python api.py --demo`` serves them so that the whole server can be tried in a minute, with
no 6 GB download; the test suite builds its models from the same pieces. The answers are
gibberish: the weights are random. The tokenizer is trained on a few lines of text with byte
fallback, like Llama-2's, so any text (Chinese included) round-trips.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from openelm_server.model.openelm import OpenELMConfig, random_state_dict, write_checkpoint

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

DEMO_MODEL_NAME = "OpenELM-demo"
DEMO_TOKENIZER_NAME = "tokenizer"


class DemoError(Exception):
    """The demo's files cannot be made; the message is one line."""


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


def demo_directory() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "openelm-server" / "demo"


def prepare_demo(directory: Path | None = None) -> tuple[Path, Path]:
    """The demo's model and tokenizer directories, made once (a second or two) and reused."""
    import sentencepiece

    directory = directory or demo_directory()
    model_dir, tokenizer_dir = directory / DEMO_MODEL_NAME, directory / DEMO_TOKENIZER_NAME
    if (model_dir / "config.json").is_file() and (tokenizer_dir / "tokenizer.model").is_file():
        return model_dir, tokenizer_dir
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place, so that an interrupted run never leaves half a demo.
        building = Path(tempfile.mkdtemp(prefix="demo-", dir=directory.parent))
    except OSError as error:
        raise DemoError(
            f"{directory.parent}: cannot write the demo model there ({error.strerror}); "
            f"set XDG_CACHE_HOME to a writable folder"
        ) from error
    try:
        train_tokenizer(building / DEMO_TOKENIZER_NAME)
        vocab = sentencepiece.SentencePieceProcessor(
            model_file=str(building / DEMO_TOKENIZER_NAME / "tokenizer.model")
        ).vocab_size()
        write_tiny_checkpoint(building / DEMO_MODEL_NAME, vocab_size=vocab, quiet_eos=True, max_context_length=2048)
        shutil.rmtree(directory, ignore_errors=True)
        building.rename(directory)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return model_dir, tokenizer_dir

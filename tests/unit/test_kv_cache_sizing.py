"""Start-up sizes the KV cache for the model and, with speculative decoding, the draft model too.

The draft caches every token the model caches, in a pool of its own laid out by the same block
tables, so a cached token costs the model's keys and values plus the draft's. Here the draft is a
smaller tiny checkpoint of the same vocabulary (fewer layers, other head counts), so the two
per-token figures differ and a sum that left one out would show.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from openelm_server import startup
from openelm_server.config import Settings
from openelm_server.model.config import OpenELMConfig
from openelm_server.model.kv_cache import BLOCK_SIZE
from openelm_server.model.loader import load_openelm
from openelm_server.startup import (
    CPU_MEMORY_FRACTION,
    StartupError,
    build_engine,
    kv_cache_bytes_per_token,
    kv_cache_tokens_that_fit,
)
from openelm_server.testing.checkpoints import write_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, own_model_dir) -> Path:
    vocab_size = json.loads((own_model_dir / "config.json").read_text())["vocab_size"]
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("draft") / "openelm-draft",
        vocab_size=vocab_size,
        num_transformer_layers=2,
        qkv_multipliers=[1.0, 1.0],
        max_context_length=2048,
    )


@pytest.fixture(scope="module")
def models(own_model_dir, draft_dir):
    return load_openelm(own_model_dir, show_progress=False), load_openelm(draft_dir, show_progress=False)


def kv_bytes_per_token_from_config(model_dir: Path, element_size: int) -> int:
    """Keys and values, each a head_dim vector per KV head in every layer."""
    config = OpenELMConfig.from_dir(model_dir)
    return 2 * sum(config.num_kv_heads) * config.head_dim * element_size


def cpu_settings(**fields) -> Settings:
    return Settings(model_path="unused", tokenizer_path="unused", device="cpu", **fields)


def serving_settings(model_dir: Path, tokenizer_dir: Path, draft_dir: Path | None, **fields) -> Settings:
    """What a server on the CPU starts with, speculating with ``draft_dir`` when there is one."""
    return Settings(
        model_path=str(model_dir),
        tokenizer_path=str(tokenizer_dir),
        draft_model_path=None if draft_dir is None else str(draft_dir),
        speculative="none" if draft_dir is None else "draft",
        device="cpu",
        cpu_linear="pytorch",
        **fields,
    )


def test_a_cached_token_costs_the_models_keys_and_values_plus_the_drafts(models, own_model_dir, draft_dir):
    model, draft = models
    target_bytes = kv_bytes_per_token_from_config(own_model_dir, 4)
    draft_bytes = kv_bytes_per_token_from_config(draft_dir, 4)
    assert target_bytes != draft_bytes  # the draft is a model of another shape
    assert kv_cache_bytes_per_token(model, None, torch.float32) == target_bytes
    assert kv_cache_bytes_per_token(model, draft, torch.float32) == target_bytes + draft_bytes
    assert kv_cache_bytes_per_token(model, draft, torch.bfloat16) == (target_bytes + draft_bytes) // 2


def test_on_the_cpu_the_pool_with_a_draft_holds_what_the_same_memory_gives_at_both_models_cost(
    monkeypatch, models, own_model_dir, draft_dir
):
    model, draft = models
    target_bytes = kv_bytes_per_token_from_config(own_model_dir, 4)
    both_bytes = target_bytes + kv_bytes_per_token_from_config(draft_dir, 4)
    free = 3000 * both_bytes / CPU_MEMORY_FRACTION  # below max_batch_size x max_model_len = 65,536 tokens
    monkeypatch.setattr(startup, "available_memory_bytes", lambda: int(free))
    settings = cpu_settings(max_batch_size=32, max_model_len=2048)
    assert kv_cache_tokens_that_fit(model, None, settings, CPU, torch.float32) == int(free / 4 // target_bytes)
    assert kv_cache_tokens_that_fit(model, draft, settings, CPU, torch.float32) == 3000
    assert 3000 < int(free / 4 // target_bytes)


def test_on_cuda_the_pool_with_a_draft_holds_what_the_utilization_leaves_at_both_models_cost(
    monkeypatch, models, own_model_dir, draft_dir
):
    model, draft = models
    target_bytes = kv_bytes_per_token_from_config(own_model_dir, 2)
    both_bytes = target_bytes + kv_bytes_per_token_from_config(draft_dir, 2)
    total = 2**30
    used = 2**28  # what the weights of both models took before the measurement
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (total - used, total))
    settings = cpu_settings(gpu_memory_utilization=0.5)
    budget = total * 0.5 - used
    cuda = torch.device("cuda")
    assert kv_cache_tokens_that_fit(model, None, settings, cuda, torch.bfloat16) == int(budget // target_bytes)
    assert kv_cache_tokens_that_fit(model, draft, settings, cuda, torch.bfloat16) == int(budget // both_bytes)


def test_too_little_memory_for_one_request_with_the_draft_names_both_caches(monkeypatch, models, own_model_dir):
    model, draft = models
    target_bytes = kv_bytes_per_token_from_config(own_model_dir, 4)
    # Room for one request of 2048 tokens in the model's cache alone, not with the draft's beside it.
    monkeypatch.setattr(startup, "available_memory_bytes", lambda: int(2100 * target_bytes / CPU_MEMORY_FRACTION))
    settings = cpu_settings(max_model_len=2048)
    assert kv_cache_tokens_that_fit(model, None, settings, CPU, torch.float32) == 2100
    with pytest.raises(StartupError, match=r"KiB each in the model's and the draft model's caches\), less than one"):
        kv_cache_tokens_that_fit(model, draft, settings, CPU, torch.float32)


def test_an_explicit_kv_cache_tokens_is_that_many_tokens_in_both_caches(own_model_dir, own_tokenizer_dir, draft_dir):
    settings = serving_settings(own_model_dir, own_tokenizer_dir, draft_dir, kv_cache_tokens=2048)
    engine, _ = build_engine(settings)
    blocks = 1 + 2048 // BLOCK_SIZE
    assert engine.core.kv_cache.num_blocks == engine.core.draft_proposer.kv_cache.num_blocks == blocks
    assert engine.core.kv_cache.nbytes == blocks * BLOCK_SIZE * kv_bytes_per_token_from_config(own_model_dir, 4)
    assert engine.core.draft_proposer.kv_cache.nbytes == blocks * BLOCK_SIZE * kv_bytes_per_token_from_config(
        draft_dir, 4
    )


@pytest.mark.parametrize("with_draft", [False, True], ids=["model alone", "with a draft"])
def test_the_start_up_log_says_whether_the_kv_cache_includes_the_drafts(
    caplog, own_model_dir, own_tokenizer_dir, draft_dir, with_draft
):
    settings = serving_settings(own_model_dir, own_tokenizer_dir, draft_dir if with_draft else None, max_batch_size=2)
    with caplog.at_level(logging.INFO):
        build_engine(settings)
    per_token = kv_bytes_per_token_from_config(own_model_dir, 4)
    if with_draft:
        per_token += kv_bytes_per_token_from_config(draft_dir, 4)
        caches = "the model's and the draft model's caches"
    else:
        caches = "the model's cache"
    mib = 4096 * per_token / 2**20
    assert f"KV cache sized to 4096 tokens ({mib:.0f} MiB in {caches}) from --max-batch-size" in caplog.text
    assert ("MiB in the draft model's cache" in caplog.text) == with_draft


def test_the_free_memory_is_measured_after_both_models_are_loaded(
    monkeypatch, own_model_dir, own_tokenizer_dir, draft_dir
):
    events: list[str] = []
    real_load, real_available = startup.load_openelm, startup.available_memory_bytes

    def load(path, **kwargs):
        events.append(f"load {Path(path).name}")
        return real_load(path, **kwargs)

    def available() -> int:
        events.append("measure")
        return real_available()

    monkeypatch.setattr(startup, "load_openelm", load)
    monkeypatch.setattr(startup, "available_memory_bytes", available)
    settings = serving_settings(own_model_dir, own_tokenizer_dir, draft_dir, max_batch_size=2)
    build_engine(settings)
    assert events == [f"load {own_model_dir.name}", f"load {draft_dir.name}", "measure"]

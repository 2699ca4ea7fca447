"""The checkpoint loader is strict about what it loads: each error names the file, tensor or shape."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from openelm_server.model.config import CheckpointError, OpenELMConfig
from openelm_server.model.loader import load_openelm
from openelm_server.testing.checkpoints import tiny_config, write_tiny_checkpoint


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_openelm(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_openelm(tmp_path / "empty")


def test_not_openelm(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "llama")
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama', not 'openelm'"):
        load_openelm(directory)


def test_config_that_is_not_json(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "broken")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot be read as JSON"):
        load_openelm(directory)


def test_no_weights(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "noweights")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_openelm(directory)


def rewrite_weights(directory, change):
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "missing")
    rewrite_weights(directory, lambda t: t.pop("transformer.layers.1.ffn.proj_2.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*transformer\.layers\.1\.ffn\.proj_2\.weight"):
        load_openelm(directory)


def test_unexpected_tensor_is_named(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "unexpected")
    rewrite_weights(directory, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'lm_head\.weight'"):
        load_openelm(directory)


def test_wrong_shape_is_named(tmp_path, own_model_dir):
    directory = copy_checkpoint(own_model_dir, tmp_path / "shape")
    rewrite_weights(directory, lambda t: t.update({"transformer.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"'transformer\.norm\.weight' has shape \(7,\)"):
        load_openelm(directory)


def test_missing_shard_is_named(tmp_path, own_model_dir):
    vocab = json.loads((own_model_dir / "config.json").read_text())["vocab_size"]
    directory = write_tiny_checkpoint(tmp_path / "shards", vocab_size=vocab, max_shard_bytes=200_000)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_openelm(directory)


def test_inconsistent_head_counts_are_refused():
    raw = tiny_config(64, num_query_heads=[4, 6, 6], num_kv_heads=[3, 3, 3])
    with pytest.raises(CheckpointError, match="layer 0 has 4 query heads for 3 KV heads"):
        OpenELMConfig.from_dict(raw)

"""Loading a published OpenELM checkpoint (one safetensors file or shards with an index).

Every error names the file, and for a tensor its name and both shapes: a wrong or half-downloaded
checkpoint must say what is wrong before anything is served.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from openelm_server.model.config import CheckpointError, OpenELMConfig
from openelm_server.model.openelm import OpenELM
from openelm_server.model.quantize import QUANTIZATIONS, Int8Linear

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def expected_tensor_shapes(config: OpenELMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = OpenELM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index_path = model_dir / SHARD_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({error!r})") from error
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {index_path.name} but missing; the download is incomplete")
        return shards
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {SHARD_INDEX}; OpenELM weights must be safetensors")


def _read_tensors(path: Path, one_mapping_each: bool):
    """(name, tensor) for each tensor of a safetensors file, as views of the memory-mapped file.

    A float32 tensor loaded as float32 on the CPU stays such a view: the file's pages are then the
    one copy of the weights. Pages read through a mapping count in the process's memory for as
    long as the mapping lives, so when the weights are converted (int8) each tensor comes from a
    mapping of its own, closed once the tensor is dropped: the float weights pass through one
    tensor at a time instead of the whole file becoming resident beside the int8 copy."""
    with safe_open(str(path), framework="pt", device="cpu") as shard:
        names = list(shard.keys())
        if not one_mapping_each:
            for name in names:
                yield name, shard.get_tensor(name)
            return
    for name in names:
        yield name, _tensor_of_its_own_mapping(path, name)


def _tensor_of_its_own_mapping(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt", device="cpu") as shard:
        return shard.get_tensor(name)


def _progress(total_bytes: int, enabled: bool):
    """A bar over the checkpoint's bytes, one file or many: the 3B model takes minutes from a slow disk."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc="Loading weights", unit="B", unit_scale=True, disable=not enabled)


def load_openelm(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    quantization: str = "none",
) -> OpenELM:
    """Build the model on the meta device and assign each tensor once, on ``device``.

    With ``quantization="int8"`` each linear layer is replaced by an int8 one as its weight is
    read (see quantize.py), so the float weights are never all held at once; the tied output
    layer gets its int8 copy of the embedding at the end."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = OpenELMConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    total_bytes = sum(path.stat().st_size for path in files)
    log.info(
        "loading OpenELM from %s (%d file%s, %.2f GB) on %s in %s%s ...",
        model_dir,
        len(files),
        "" if len(files) == 1 else "s",
        total_bytes / 1e9,
        device,
        str(dtype).removeprefix("torch."),
        ", linear layers in int8" if quantization == "int8" else "",
    )
    started = time.monotonic()
    with torch.device("meta"):
        model = OpenELM(config)
    parameters = dict(model.named_parameters())
    loaded: set[str] = set()
    finished_bytes = 0
    with _progress(total_bytes, show_progress) as progress:
        for path in files:
            for name, tensor in _read_tensors(path, one_mapping_each=quantization != "none"):
                if name not in parameters:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
                expected = tuple(parameters[name].shape)
                if tuple(tensor.shape) != expected:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {expected}"
                    )
                module_name, _, attribute = name.rpartition(".")
                module = model.get_submodule(module_name)
                if quantization == "int8" and isinstance(module, nn.Linear):
                    parent_name, _, child_name = module_name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child_name, Int8Linear.quantize(tensor.to(device), name))
                else:
                    # With int8 layers nothing may stay a view of the file (see _read_tensors).
                    value = tensor.to(device=device, dtype=dtype, copy=quantization != "none")
                    setattr(module, attribute, nn.Parameter(value, requires_grad=False))
                loaded.add(name)
                progress.update(tensor.numel() * tensor.element_size())
                del tensor  # with int8, its mapping closes now (see _read_tensors)
            finished_bytes += path.stat().st_size
            progress.update(finished_bytes - progress.n)  # the file's header, so that the bar ends at 100%
    missing = sorted(set(parameters) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: {len(missing)} tensors missing from the checkpoint: {shown}")
    if quantization == "int8" and model.lm_head is None:
        model.lm_head = Int8Linear.quantize(
            model.transformer.token_embeddings.weight, "transformer.token_embeddings.weight (as the output layer)"
        )
    model.rope_tables(device)
    model.eval()
    log.info(
        "loaded OpenELM (%d layers, %.2fB parameters) from %s on %s in %s%s in %.1f s",
        config.num_layers,
        sum(p.numel() for p in parameters.values()) / 1e9,
        model_dir,
        device,
        str(dtype).removeprefix("torch."),
        ", linear layers in int8" if quantization == "int8" else "",
        time.monotonic() - started,
    )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

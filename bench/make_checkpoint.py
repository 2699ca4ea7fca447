"""Write a random-weight OpenELM checkpoint with the published shapes and file layout.

    python -m bench.make_checkpoint --size 270M --dtype float32 --out /tmp/openelm-270M
    python -m bench.make_checkpoint --size 3B --dtype bfloat16 --out /tmp/openelm-3B   # two shards

The directory gets config.json (the compact form of Apple's config; the server derives the
per-layer head and FFN lists from it exactly as the published config does),
generation_config.json, and model.safetensors, or numbered shards plus
model.safetensors.index.json when the weights exceed ``--max-shard-gb`` (the published 3B is
two shards: 5 GB + 1 GB in bfloat16, which the default of 5 reproduces).

Memory: tensors are made one at a time (each drawn in float32, then cast) and written by
safetensors straight from the tensors' memory, so the process holds one copy of the weights
(about 6.1 GB for 3B in bfloat16, 12.1 GB in float32) plus the largest single tensor in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from openelm_server.model.config import OpenELMConfig
from openelm_server.model.loader import expected_tensor_shapes
from openelm_server.testing.checkpoints import published_config, random_state_dict, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]

SIZES = ("270M", "450M", "1_1B", "3B")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def build_config(size: str, vocab_size: int = 32000, layers: int | None = None, overrides: dict | None = None) -> dict:
    """The published config of ``size``, optionally cut to ``layers`` layers and with keys
    replaced by ``overrides`` (a small shape for tests: model_dim, head_dim, ...)."""
    raw = published_config(size, vocab_size=vocab_size)
    if layers is not None:
        raw["num_transformer_layers"] = layers
    raw.update(overrides or {})
    OpenELMConfig.from_dict(raw, source=f"{size} config")  # validates; raises CheckpointError
    return raw


def parameter_count(raw: dict) -> int:
    config = OpenELMConfig.from_dict(raw)
    return sum(math.prod(shape) for shape in expected_tensor_shapes(config).values())


def make_checkpoint(
    out: str | Path,
    raw: dict,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_gb: float | None = 5.0,
    std: float = 0.02,
) -> dict:
    """Write the checkpoint; return a summary (parameters, bytes, files, seconds)."""
    start = time.monotonic()
    config = OpenELMConfig.from_dict(raw)
    tensors = random_state_dict(config, seed=seed, dtype=dtype, std=std)
    raw = {**raw, "torch_dtype": str(dtype).removeprefix("torch.")}
    max_shard_bytes = int(max_shard_gb * 1e9) if max_shard_gb else None
    write_checkpoint(out, raw, tensors, max_shard_bytes=max_shard_bytes)
    parameters = sum(t.numel() for t in tensors.values())
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    files = sorted(p.name for p in Path(out).iterdir())
    return {"parameters": parameters, "bytes": total_bytes, "files": files, "seconds": time.monotonic() - start}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="270M", help="published OpenELM shape")
    parser.add_argument("--out", required=True, help="directory to write (created)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="dtype stored in the files (the published checkpoints are bfloat16)",
    )
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="largest shard in GB (1e9 bytes); 0 = always one model.safetensors",
    )
    parser.add_argument("--vocab-size", type=int, default=32000, help="Llama-2 tokenizer size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="std of the random weights (norms are ~1)")
    parser.add_argument("--layers", type=int, default=None, help="override num_transformer_layers (tests)")
    parser.add_argument(
        "--config-json",
        default=None,
        help='JSON object of config keys to override, e.g. \'{"model_dim": 128, "head_dim": 16}\'',
    )
    parser.add_argument("--force", action="store_true", help="overwrite a directory that already has a checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = json.loads(args.config_json) if args.config_json else None
    if overrides is not None and not isinstance(overrides, dict):
        print("error: --config-json must be a JSON object", file=sys.stderr)
        return 2
    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        print(f"error: {out} already holds a checkpoint; pass --force to overwrite", file=sys.stderr)
        return 2
    raw = build_config(args.size, args.vocab_size, args.layers, overrides)
    expected = parameter_count(raw)
    dtype = DTYPES[args.dtype]
    print(
        f"OpenELM-{args.size} shape: {raw['num_transformer_layers']} layers, model_dim {raw['model_dim']}, "
        f"{expected:,} parameters = {expected * torch.empty((), dtype=dtype).element_size() / 1e9:.2f} GB "
        f"in {args.dtype}",
        flush=True,
    )
    summary = make_checkpoint(
        out, raw, dtype=dtype, seed=args.seed, max_shard_gb=args.max_shard_gb or None, std=args.std
    )
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(
        f"wrote {summary['parameters']:,} parameters ({summary['bytes'] / 1e9:.2f} GB) to {out}: "
        f"{', '.join(summary['files'])} in {summary['seconds']:.1f} s; peak RSS {peak_rss_gb:.2f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

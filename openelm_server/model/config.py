"""OpenELM's configuration as Apple publishes it (``config.json``), with the per-layer head counts and
FFN widths derived exactly as the published configuration code derives them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class CheckpointError(ValueError):
    """The directory is not a usable OpenELM checkpoint; the message names the file."""


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of ``divisor``, never more than 10% below ``value``.

    This is the rounding OpenELM's published configuration uses to derive head counts and
    FFN widths from its multipliers; reproducing it exactly is what makes shapes match.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _per_layer(values: float | Sequence[float], num_layers: int) -> list[float]:
    """Expand a multiplier given as a scalar, a [low, high] range, or already per layer."""
    if isinstance(values, (int, float)):
        return [float(values)] * num_layers
    values = list(values)
    if len(values) == num_layers:
        return [float(v) for v in values]
    if len(values) == 2:
        low, high = values
        if num_layers == 1:
            return [round(float(low), 2)]
        step = (high - low) / (num_layers - 1)
        return [round(low + i * step, 2) for i in range(num_layers)]
    raise ValueError(f"expected 1, 2 or {num_layers} multipliers, got {len(values)}")


@dataclass(frozen=True)
class OpenELMConfig:
    vocab_size: int
    model_dim: int
    head_dim: int
    num_query_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    ffn_dims: tuple[int, ...]
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    max_context_length: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    norm_eps: float = 1e-6

    @property
    def num_layers(self) -> int:
        return len(self.num_query_heads)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> OpenELMConfig:
        """Build from a published ``config.json``; derive per-layer lists the way it does."""
        if raw.get("model_type") != "openelm":
            raise CheckpointError(
                f"{source}: model_type is {raw.get('model_type')!r}, not 'openelm'; "
                "this server only runs OpenELM checkpoints"
            )
        try:
            num_layers = int(raw["num_transformer_layers"])
            model_dim = int(raw["model_dim"])
            head_dim = int(raw["head_dim"])
            groups = int(raw["num_gqa_groups"])
            if raw.get("num_query_heads") is not None and not isinstance(raw["num_query_heads"], int):
                num_query_heads = [int(h) for h in raw["num_query_heads"]]
            else:
                qkv_multipliers = _per_layer(raw["qkv_multipliers"], num_layers)
                num_query_heads = [
                    make_divisible(model_dim * m, head_dim * groups) // head_dim for m in qkv_multipliers
                ]
            if raw.get("num_kv_heads") is not None and not isinstance(raw["num_kv_heads"], int):
                num_kv_heads = [int(h) for h in raw["num_kv_heads"]]
            else:
                num_kv_heads = [q // groups for q in num_query_heads]
            ffn_multipliers = _per_layer(raw["ffn_multipliers"], num_layers)
            ffn_divisor = int(raw.get("ffn_dim_divisor", 256))
            ffn_dims = [make_divisible(m * model_dim, ffn_divisor) for m in ffn_multipliers]
            activation = raw.get("activation_fn_name", "swish")
            normalization = raw.get("normalization_layer_name", "rms_norm")
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: not a valid OpenELM config ({error!r})") from error
        if activation not in ("swish", "silu"):
            raise CheckpointError(f"{source}: activation {activation!r} is not supported (only swish)")
        if normalization != "rms_norm":
            raise CheckpointError(f"{source}: normalization {normalization!r} is not supported (only rms_norm)")
        if len(num_query_heads) != num_layers or len(num_kv_heads) != num_layers:
            raise CheckpointError(f"{source}: per-layer head lists do not have {num_layers} entries")
        for layer, (q, kv) in enumerate(zip(num_query_heads, num_kv_heads)):
            if kv <= 0 or q % kv:
                raise CheckpointError(f"{source}: layer {layer} has {q} query heads for {kv} KV heads")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            model_dim=model_dim,
            head_dim=head_dim,
            num_query_heads=tuple(num_query_heads),
            num_kv_heads=tuple(num_kv_heads),
            ffn_dims=tuple(ffn_dims),
            ffn_with_glu=bool(raw.get("ffn_with_glu", True)),
            normalize_qk_projections=bool(raw.get("normalize_qk_projections", True)),
            share_input_output_layers=bool(raw.get("share_input_output_layers", True)),
            rope_freq_constant=float(raw.get("rope_freq_constant", 10000)),
            max_context_length=int(raw.get("max_context_length", 2048)),
            bos_token_id=int(raw.get("bos_token_id", 1)),
            eos_token_id=int(raw.get("eos_token_id", 2)),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> OpenELMConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; is {model_dir} an OpenELM model directory?")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot be read as JSON ({error})") from error
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: is not a JSON object")
        return cls.from_dict(raw, source=str(path))

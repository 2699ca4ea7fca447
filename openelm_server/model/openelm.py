"""OpenELM in plain PyTorch: configuration, layers and checkpoint loading.

Reads the checkpoints Apple publishes (``config.json`` + safetensors) without their remote
code. The forward pass is made for serving: keys are rotated once and stored rotated in a
:class:`~openelm_server.model.kv_cache.KVCache`, and every token carries its own position, so one
call can prefill prompts or decode one token for sequences that sit at different positions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from openelm_server.model.kv_cache import KVCache

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalising in float32 keeps bfloat16 activations from losing the mean square.
    x_float = x.float()
    normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, computed in float32 whatever the activations' dtype."""
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    return (x_float * cos + torch.cat((-second, first), dim=-1) * sin).type_as(x)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_ELEMENTWISE = {"rms_norm": rms_norm, "rotate": rotate, "silu_and_mul": silu_and_mul}


def fuse_elementwise(enabled: bool) -> None:
    """Compile (or restore) the element-wise chains above into one fused kernel each.

    Each chain is several kernels over a few thousand numbers, each costing the GPU a microsecond
    or two whatever its size: a decode step of the 3B model launches about 2,300 kernels, and
    fused about 800 (4.8 instead of 7.8 ms per step for one sequence on an H100; measured by
    bench/cuda_check.py). It rebinds this module's functions, which every layer calls, so it holds
    for every model in the process. ``dynamic=True``: one compilation serves every batch and length.
    """
    for name, function in _ELEMENTWISE.items():
        globals()[name] = torch.compile(function, dynamic=True) if enabled else function


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# Not cuDNN's attention: it builds an execution plan for every new shape, and OpenELM's layers
# differ in head count, so each new prompt length cost 36 plans, about 300 ms before the first
# token on an H100. The memory-efficient kernel takes the mask with no per-shape set-up.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_query_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention where each KV head serves a group of consecutive query heads.

    The group is folded into the query-length axis ([batch, kv_heads, group * length, dim]),
    so keys and values are read once per KV head instead of being repeated per query head,
    and any SDPA kernel that takes a mask can run it.
    """
    batch, query_heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    group = query_heads // kv_heads
    if group > 1:
        queries = queries.reshape(batch, kv_heads, group * length, dim)
        context = mask.shape[-1]
        mask = mask.unsqueeze(2).expand(batch, 1, group, length, context).reshape(batch, 1, group * length, context)
    with sdpa_kernel(ATTENTION_BACKENDS):
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    return attended.reshape(batch, query_heads, length, dim)


class Attention(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = config.head_dim
        self.num_query_heads = config.num_query_heads[layer]
        self.num_kv_heads = config.num_kv_heads[layer]
        qkv_heads = self.num_query_heads + 2 * self.num_kv_heads
        self.qkv_proj = nn.Linear(config.model_dim, qkv_heads * config.head_dim, bias=False)
        if config.normalize_qk_projections:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.out_proj = nn.Linear(self.num_query_heads * config.head_dim, config.model_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: ForwardBatch) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        queries, keys, values = qkv.split([self.num_query_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            queries = self.q_norm(queries)
            keys = self.k_norm(keys)
        cos, sin = rope
        queries = rotate(queries, cos, sin)
        keys = rotate(keys, cos, sin)

        step.kv_cache.write(self.layer, step.slot_index, step.positions, keys, values)
        cached_keys, cached_values = step.kv_cache.read(self.layer, step.slots, step.context_length)
        attended = grouped_query_attention(queries, cached_keys, cached_values, step.attention_mask)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        hidden = config.ffn_dims[layer]
        self.with_glu = config.ffn_with_glu
        self.proj_1 = nn.Linear(config.model_dim, 2 * hidden if self.with_glu else hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, config.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_glu:
            return self.proj_2(silu_and_mul(self.proj_1(x)))
        return self.proj_2(F.silu(self.proj_1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.model_dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.model_dim, config.norm_eps)
        self.ffn = FeedForward(config, layer)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: ForwardBatch) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, step)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Named as in the published checkpoints, so that state-dict keys match them directly."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.model_dim, config.norm_eps)


@dataclass
class ForwardBatch:
    """Where each token of one forward call sits: its sequence's cache slot and its position.

    ``positions`` is [batch, length]; rows are sequences, ``slots[i]`` is row i's cache slot.
    Padding at the end of a row is harmless: it writes keys past that row's last real token,
    where they are overwritten before anything reads them.
    """

    kv_cache: KVCache
    slots: list[int]
    positions: torch.Tensor
    slot_index: torch.Tensor
    context_length: int
    attention_mask: torch.Tensor

    @classmethod
    def build(
        cls,
        kv_cache: KVCache,
        slots: list[int],
        positions: torch.Tensor,
        context_length: int | None = None,
        slot_index: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """A CUDA-graph step passes ``context_length`` (keys attended, > every position) and
        ``slot_index`` ([batch, 1] on the device) so that nothing here syncs with the host."""
        if context_length is None:
            context_length = int(positions.max()) + 1
        device = positions.device
        key_positions = torch.arange(context_length, device=device)
        mask = key_positions.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)
        if slot_index is None:
            slot_index = torch.tensor(slots, device=device).unsqueeze(1)
        return cls(kv_cache, slots, positions, slot_index.expand_as(positions), context_length, mask)


class OpenELM(nn.Module):
    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = (
            None if config.share_input_output_layers else nn.Linear(config.model_dim, config.vocab_size, bias=False)
        )

    def rope_tables(self, device: torch.device) -> None:
        """Cos/sin per position, float32, built once on the model's device after loading."""
        dim = self.config.head_dim
        inv_freq = 1.0 / (
            self.config.rope_freq_constant ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        )
        angles = torch.outer(torch.arange(self.config.max_context_length, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos = angles.cos()
        self.rope_sin = angles.sin()

    def forward(self, token_ids: torch.Tensor, step: ForwardBatch) -> torch.Tensor:
        """Hidden states [batch, length, model_dim] after the final norm; fills the cache."""
        rope = (self.rope_cos[step.positions].unsqueeze(1), self.rope_sin[step.positions].unsqueeze(1))
        x = self.transformer.token_embeddings(token_ids)
        for layer in self.transformer.layers:
            x = layer(x, rope, step)
        return self.transformer.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.transformer.token_embeddings.weight)
        return self.lm_head(hidden)

    def new_kv_cache(self, num_slots: int, max_length: int) -> KVCache:
        embeddings = self.transformer.token_embeddings.weight
        return KVCache(
            self.config.num_kv_heads,
            self.config.head_dim,
            num_slots,
            max_length,
            dtype=embeddings.dtype,
            device=embeddings.device,
        )


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


def _progress(total_bytes: int, enabled: bool):
    """A bar over the checkpoint's bytes, one file or many: the 3B model takes minutes from a slow disk."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc="Loading weights", unit="B", unit_scale=True, disable=not enabled)


def load_openelm(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> OpenELM:
    """Build the model on the meta device and assign each tensor once, on ``device``."""
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
        "loading OpenELM from %s (%d file%s, %.2f GB) on %s in %s ...",
        model_dir,
        len(files),
        "" if len(files) == 1 else "s",
        total_bytes / 1e9,
        device,
        str(dtype).removeprefix("torch."),
    )
    started = time.monotonic()
    with torch.device("meta"):
        model = OpenELM(config)
    parameters = dict(model.named_parameters())
    loaded: set[str] = set()
    finished_bytes = 0
    with _progress(total_bytes, show_progress) as progress:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    if name not in parameters:
                        raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
                    tensor = shard.get_tensor(name)
                    expected = tuple(parameters[name].shape)
                    if tuple(tensor.shape) != expected:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {expected}"
                        )
                    module_name, _, attribute = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    setattr(module, attribute, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
                    loaded.add(name)
                    progress.update(tensor.numel() * tensor.element_size())
            finished_bytes += path.stat().st_size
            progress.update(finished_bytes - progress.n)  # the file's header, so that the bar ends at 100%
    missing = sorted(set(parameters) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: {len(missing)} tensors missing from the checkpoint: {shown}")
    model.rope_tables(device)
    model.eval()
    log.info(
        "loaded OpenELM (%d layers, %.2fB parameters) from %s on %s in %s in %.1f s",
        config.num_layers,
        count_parameters(model) / 1e9,
        model_dir,
        device,
        str(dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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

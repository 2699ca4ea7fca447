"""OpenELM in plain PyTorch: the layers and the forward pass, nothing else.

Reads the weights Apple publishes by their names (see loader.py), without their remote code. The
forward pass is made for serving: keys are rotated once and stored rotated in a
:class:`~openelm_server.model.kv_cache.KVCache`, and every token carries its own position, so one
call can prefill prompts or decode one token for sequences that sit at different positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from openelm_server.model.config import OpenELMConfig
from openelm_server.model.kv_cache import KVCache


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

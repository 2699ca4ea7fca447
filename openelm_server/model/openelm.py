"""OpenELM in plain PyTorch: the layers and the forward pass, nothing else.

Reads the weights Apple publishes by their names (see loader.py), without their remote code. The
forward pass is made for serving: keys are rotated once and stored rotated in the blocks of a
:class:`~openelm_server.model.kv_cache.KVCache`, and every token carries its own position and
cache slot, so one call can decode one token for some sequences and prefill prompt chunks of
others, each at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from openelm_server.model import cpu_elementwise, cpu_extension
from openelm_server.model.config import OpenELMConfig
from openelm_server.model.cpu_attention import paged_decode_attention
from openelm_server.model.kv_cache import KVCache


# The element-wise chains below run as one call of our own for float32 on the CPU where our
# kernels build (cpu_elementwise.py), and are fused by torch.compile on CUDA (fuse_elementwise).
def _ours(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and cpu_extension.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _ours(x):
        return cpu_elementwise.rms_norm(x, weight, eps)
    # PyTorch's op computes bfloat16 inputs in float32, and is one call where the written-out
    # norm was seven: a decode step calls it 33 times per sequence on OpenELM-270M.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, computed in float32 whatever the activations' dtype."""
    return _rotated(x.float(), cos, sin).type_as(x)


def norm_and_rotate(
    qk: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """The queries' and keys' per-head RMSNorm and rotary embedding in one pass over [tokens,
    query_heads + kv_heads, head_dim], in float32 whatever the activations' dtype. The weights
    come one row per head ([query_heads, head_dim] and [kv_heads, head_dim], expanded views):
    fused, this is one kernel per layer on CUDA where separate norms and rotations were four,
    and eagerly it is half the ops."""
    if _ours(qk):
        return cpu_elementwise.norm_and_rotate(qk, query_weight, key_weight, eps, cos, sin)
    weight = torch.cat((query_weight, key_weight)).float()
    return _rotated(F.rms_norm(qk.float(), (qk.shape[-1],), None, eps) * weight, cos, sin).type_as(qk)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _ours(gate_up):
        return cpu_elementwise.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_ELEMENTWISE = {
    "rms_norm": rms_norm,
    "rotate": rotate,
    "norm_and_rotate": norm_and_rotate,
    "silu_and_mul": silu_and_mul,
}


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
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: AttentionGroup
) -> torch.Tensor:
    """A group's queries [rows * query_length, query_heads, dim] (row by row) attend over their
    rows' keys and values [rows, kv_heads, context, dim]; out: [rows * query_length, query_heads * dim].

    Each KV head serves a group of consecutive query heads, folded into the query-length axis
    ([rows, kv_heads, heads_per_kv * query_length, dim]), so keys and values are read once per KV
    head instead of being repeated per query head, and any SDPA kernel that takes a mask can run
    it. A decode row's one query folds as it lies: a view in and a reshape out, where longer rows
    take a transposition each way.
    """
    tokens, query_heads, dim = queries.shape
    rows, length = group.rows, group.query_length
    kv_heads = keys.shape[1]
    heads_per_kv = query_heads // kv_heads
    if length == 1:
        folded = queries.view(rows, kv_heads, heads_per_kv, dim)
    else:
        folded = queries.view(rows, length, kv_heads, heads_per_kv, dim).permute(0, 2, 3, 1, 4)
        folded = folded.reshape(rows, kv_heads, heads_per_kv * length, dim)
    attended = F.scaled_dot_product_attention(
        folded, keys, values, attn_mask=group.folded_bias(heads_per_kv, queries.dtype)
    )
    if length > 1:
        attended = attended.reshape(rows, kv_heads, heads_per_kv, length, dim).permute(0, 3, 1, 2, 4)
    return attended.reshape(tokens, query_heads * dim)


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

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        """Queries [tokens, query_heads, head_dim] of the normed ``x`` [tokens, model_dim]; the
        keys and values go to the cache, at the batch's slots. Every token on its own: no token
        sees another here, which is what lets a CUDA graph run this part for padded token counts."""
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)
        qk, values = qkv.split([self.num_query_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        cos, sin = rope
        if self.q_norm is not None:
            # Queries and keys together: the query heads take q_norm's weight, the key heads k_norm's.
            query_weight = self.q_norm.weight.expand(self.num_query_heads, -1)
            key_weight = self.k_norm.weight.expand(self.num_kv_heads, -1)
            qk = norm_and_rotate(qk, query_weight, key_weight, self.q_norm.eps, cos, sin)
        else:
            qk = rotate(qk, cos, sin)
        queries, keys = qk.split([self.num_query_heads, self.num_kv_heads], dim=1)
        batch.kv_cache.write(self.layer, batch.slot_mapping, keys, values)
        return queries

    def attend(self, queries: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[tokens, query_heads * head_dim]: each group's tokens attend over their sequences'
        cached keys, the groups one after another (tokens past the last group are not read).
        Decode rows on the CPU read the cache in place with our kernel where the cache allows it
        (cpu_attention.py); other groups gather their blocks for SDPA."""
        attended = []
        cache = batch.kv_cache
        for group in batch.groups:
            if group.query_length == 1 and cache.attends_in_place:
                attended.append(
                    paged_decode_attention(
                        queries[group.start : group.end],
                        cache.keys[self.layer],
                        cache.values[self.layer],
                        group.block_table,
                        group.context_lengths(),
                        self.head_dim**-0.5,
                    )
                )
                continue
            cached_keys, cached_values = cache.gather(self.layer, group.block_table)
            attended.append(
                grouped_query_attention(queries[group.start : group.end], cached_keys, cached_values, group)
            )
        return attended[0] if len(attended) == 1 else torch.cat(attended)


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

    # A layer runs in three parts: the per-token work before attention, attention, and the
    # per-token work after it. OpenELM.forward runs them in order; on CUDA, steps that read
    # prompts replay the per-token parts as graphs around eager attention (engine/piecewise_graphs.py).
    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        return self.attn.queries(self.attn_norm(x), rope, batch)

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.out_proj(attended)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Named as in the published checkpoints, so that state-dict keys match them directly."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.model_dim, config.norm_eps)


@dataclass
class AttentionGroup:
    """Rows that attend together: ``rows`` sequences of ``query_length`` tokens each, tokens
    [start, end) of the batch in row order, at ``positions`` [rows, query_length]. Row i's keys
    are in the blocks of ``block_table[i]`` ([rows, blocks]; padding entries point at the scratch
    block); ``mask`` [rows, 1, query_length, blocks * block_size] lets each token see the
    positions up to its own.

    Every layer attends with the same mask, so the form attention takes (query heads folded per
    KV head, additive: 0 or -inf in the activations' dtype) is made once per step and kept in
    ``_biases`` (with the rows' context lengths, which the CPU's decode attention takes):
    building it in each layer cost 4 small ops per layer and group, a sixth of an eager step's
    ops when prompts are read."""

    start: int
    rows: int
    query_length: int
    positions: torch.Tensor
    block_table: torch.Tensor
    mask: torch.Tensor
    _biases: dict = field(default_factory=dict, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.rows * self.query_length

    @classmethod
    def build(cls, start: int, positions: torch.Tensor, block_table: torch.Tensor, block_size: int) -> AttentionGroup:
        """``positions`` [rows, query_length] on the device; building the mask there needs no host sync."""
        rows, query_length = positions.shape
        key_positions = torch.arange(block_table.shape[1] * block_size, device=positions.device)
        mask = key_positions.view(1, 1, 1, -1) <= positions.view(rows, 1, query_length, 1)
        return cls(start, rows, query_length, positions, block_table, mask)

    def folded_bias(self, heads_per_kv: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask for ``heads_per_kv`` query heads folded into the query axis, as an additive
        bias [rows, 1, heads_per_kv * query_length, context] (what SDPA makes of a bool mask)."""
        key = (heads_per_kv, dtype)
        if key not in self._biases:
            mask = self.mask
            if heads_per_kv > 1:
                rows, _, length, context = mask.shape
                mask = mask.unsqueeze(2).expand(rows, 1, heads_per_kv, length, context)
                mask = mask.reshape(rows, 1, heads_per_kv * length, context)
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self._biases[key] = bias.masked_fill_(~mask, float("-inf"))
        return self._biases[key]

    def context_lengths(self) -> torch.Tensor:
        """[rows] int64: the keys each row's last token sees (its position + 1), made once per step."""
        if "lengths" not in self._biases:
            self._biases["lengths"] = self.positions[:, -1] + 1
        return self._biases["lengths"]


@dataclass
class ForwardBatch:
    """Where each token of one forward call goes: its position, the cache slot its keys are
    written to (``slot_mapping``, block * block_size + offset), and the attention groups.

    Tokens are counted flat, in the order of the token ids passed to the model (a [rows, length]
    input is read row by row). Decoding rows and prompt chunks of different lengths share one
    call: every layer but attention sees one flat run of tokens, attention runs per group.
    """

    kv_cache: KVCache
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls, kv_cache: KVCache, slots: list[int], positions: torch.Tensor, context_length: int | None = None
    ) -> ForwardBatch:
        """Rows of equal length in the fixed slots of a cache made by ``OpenELM.new_kv_cache``:
        row i is the sequence in slot ``slots[i]``, ``positions`` [rows, length]. For the model
        alone (tests, warm-ups, benchmarks); the engine pages its cache through a block manager."""
        if context_length is None:
            context_length = int(positions.max()) + 1
        device = positions.device
        tables = [kv_cache.slot_block_table(slot, context_length) for slot in slots]
        block_table = torch.tensor(tables, dtype=torch.long, device=device)
        block_size = kv_cache.block_size
        row_blocks = block_table.gather(1, positions // block_size)
        slot_mapping = (row_blocks * block_size + positions % block_size).reshape(-1)
        group = AttentionGroup.build(0, positions, block_table, block_size)
        return cls(kv_cache, positions.reshape(-1), slot_mapping, [group])


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

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states (``token_ids``' shape + [model_dim]) after the final norm; fills the cache."""
        rope = self.rope(batch.positions)
        x = self.transformer.token_embeddings(token_ids.reshape(-1))
        # Chosen once per forward, not per attention call: entering it costs ~20 us of Python.
        with sdpa_kernel(ATTENTION_BACKENDS):
            for layer in self.transformer.layers:
                queries = layer.queries(x, rope, batch)
                x = layer.after_attention(x, layer.attn.attend(queries, batch))
        return self.transformer.norm(x).view(*token_ids.shape, -1)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin [tokens, 1, head_dim] at ``positions`` [tokens]."""
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.transformer.token_embeddings.weight)
        return self.lm_head(hidden)

    def new_kv_cache(self, num_slots: int, max_length: int) -> KVCache:
        """A cache in fixed slots of ``max_length`` tokens, for ``ForwardBatch.build``."""
        embeddings = self.transformer.token_embeddings.weight
        return KVCache.for_slots(
            self.config.num_kv_heads, self.config.head_dim, num_slots, max_length, embeddings.dtype, embeddings.device
        )

    def new_paged_kv_cache(self, num_blocks: int) -> KVCache:
        """A pool of ``num_blocks`` blocks for the engine's block manager."""
        embeddings = self.transformer.token_embeddings.weight
        return KVCache(self.config.num_kv_heads, self.config.head_dim, num_blocks, embeddings.dtype, embeddings.device)

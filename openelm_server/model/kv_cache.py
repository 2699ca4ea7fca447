"""The key/value cache: one pool of fixed-size blocks per layer, allocated once at start-up.

Each layer holds keys and values as [num_blocks, block_size, kv_heads, head_dim] (OpenELM layers
differ in KV head count, so layers are separate tensors). A sequence's tokens sit in the blocks
its block table lists, in order: position p is at offset p % block_size of block
table[p // block_size]; keys are stored rotated. Which block belongs to which sequence is the
engine's business (engine/block_manager.py); this file holds the tensors.

Block 0 is scratch and never given to a sequence: padding tokens write there and padding entries
of a block table point there, so padding never touches a sequence's keys.

``attends_in_place``: a float32 cache on the CPU whose head_dim our decode attention takes
(cpu_attention.py), where our CPU kernels build, is read in place by decode rows; every other
cache is gathered block by block for SDPA.
"""

from __future__ import annotations

import math

import torch

from openelm_server.model import cpu_extension

BLOCK_SIZE = 16
SCRATCH_BLOCK = 0


class KVCache:
    def __init__(
        self,
        num_kv_heads: tuple[int, ...],
        head_dim: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = BLOCK_SIZE,
        slot_length: int | None = None,
    ):
        """``slot_length`` lays the cache out in fixed slots of that many tokens (slot s owns the
        blocks after the scratch block in order), for callers that run fixed rows without a
        block manager: tests, warm-ups and benchmarks of the model alone."""
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.slot_length = slot_length
        self.keys = [torch.zeros(num_blocks, block_size, h, head_dim, dtype=dtype, device=device) for h in num_kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.attends_in_place = (
            torch.device(device).type == "cpu"
            and dtype == torch.float32
            and head_dim % 8 == 0
            and cpu_extension.available()
        )

    @classmethod
    def for_slots(
        cls,
        num_kv_heads: tuple[int, ...],
        head_dim: int,
        num_slots: int,
        slot_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        blocks = 1 + num_slots * math.ceil(slot_length / BLOCK_SIZE)
        return cls(num_kv_heads, head_dim, blocks, dtype, device, slot_length=slot_length)

    @staticmethod
    def bytes_per_token(num_kv_heads: tuple[int, ...], head_dim: int, dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * sum(num_kv_heads) * head_dim * element_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def slot_block_table(self, slot: int, length: int) -> list[int]:
        """The blocks of fixed slot ``slot`` that hold its first ``length`` tokens."""
        if self.slot_length is None:
            raise ValueError("this KV cache is paged by a block manager, not laid out in fixed slots")
        per_slot = math.ceil(self.slot_length / self.block_size)
        first = 1 + slot * per_slot
        if first + per_slot > self.num_blocks or length > self.slot_length:
            raise ValueError(f"slot {slot} with {length} tokens is beyond a cache of {self.num_blocks} blocks")
        return list(range(first, first + math.ceil(length / self.block_size)))

    def write(self, layer: int, slot_mapping: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store [tokens, heads, dim] keys/values at ``slot_mapping`` [tokens] (block * block_size + offset)."""
        heads, dim = keys.shape[1:]
        self.keys[layer].view(-1, heads, dim).index_copy_(0, slot_mapping, keys)
        self.values[layer].view(-1, heads, dim).index_copy_(0, slot_mapping, values)

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, heads, blocks * block_size, dim] of the blocks in ``block_table``
        [rows, blocks], in table order: key j of a row is that row's position j."""
        rows, blocks = block_table.shape
        # index_select copies whole blocks; advanced indexing (pool[table]) took 8x as long on
        # the CPU, 14% of a 16-sequence decode step.
        flat_table = block_table.reshape(-1)
        keys = self.keys[layer].index_select(0, flat_table)
        values = self.values[layer].index_select(0, flat_table)
        heads, dim = keys.shape[-2:]
        length = blocks * self.block_size
        return (
            keys.view(rows, length, heads, dim).transpose(1, 2),
            values.view(rows, length, heads, dim).transpose(1, 2),
        )

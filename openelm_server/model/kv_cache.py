"""The key/value cache: one slot per running sequence, allocated once at start-up.

Each layer holds keys and values as [slots, kv_heads, max_length, head_dim] (OpenELM layers
differ in KV head count, so layers are separate tensors). A sequence owns one slot from
admission to finish; its tokens sit at their positions in it, keys already rotated. Reading a
run of consecutive slots is a view, so decoding the whole running batch copies nothing.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_kv_heads: tuple[int, ...],
        head_dim: int,
        num_slots: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_slots = num_slots
        self.max_length = max_length
        self.keys = [torch.zeros(num_slots, h, max_length, head_dim, dtype=dtype, device=device) for h in num_kv_heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self._free_slots = list(range(num_slots))

    @staticmethod
    def bytes_needed(
        num_kv_heads: tuple[int, ...], head_dim: int, num_slots: int, max_length: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * sum(num_kv_heads) * head_dim * num_slots * max_length * element_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_slot_count(self) -> int:
        return len(self._free_slots)

    @property
    def used_slot_count(self) -> int:
        return self.num_slots - len(self._free_slots)

    def allocate(self) -> int | None:
        """The lowest free slot, so that running sequences stay packed at the front."""
        if not self._free_slots:
            return None
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free_slots or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free_slots.append(slot)

    def write(
        self, layer: int, slot_index: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store [batch, heads, length, dim] keys/values at (slot_index, positions), both [batch, length]."""
        self.keys[layer][slot_index, :, positions] = keys.transpose(1, 2)
        self.values[layer][slot_index, :, positions] = values.transpose(1, 2)

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, heads, length, dim] of the first ``length`` positions of ``slots``."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            window = slice(first, first + len(slots))
            return self.keys[layer][window, :, :length], self.values[layer][window, :, :length]
        index = torch.tensor(slots, device=self.keys[layer].device)
        return self.keys[layer][index, :, :length], self.values[layer][index, :, :length]

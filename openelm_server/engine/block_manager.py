"""Which KV-cache blocks each request holds, and which full blocks can be shared (prefix caching).

Invariants: a block is either held (reference count > 0, listed in the block tables of the
requests holding it) or free (in ``free``, in eviction order). With prefix caching a full block
is known by a hash chained over its tokens and every token before them, so equal hashes mean
equal keys and values; a freed block keeps its hash and can be taken back by a later request
until it is handed out again (evicted), least recently used first. Block 0 is the cache's scratch
block and never handed out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from openelm_server.model.kv_cache import SCRATCH_BLOCK


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of them, tokens found cached


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, the next to hand out first: blocks without content, then cached ones by age.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks) if b != SCRATCH_BLOCK)
        self.hash_of_block: dict[int, bytes] = {}
        self.block_of_hash: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free)

    def blocks_needed(self, block_ids: list[int], num_tokens: int) -> int:
        """New blocks a table of ``block_ids`` needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_ids))

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks holding the longest prefix of ``token_ids``; at least the last token
        is left out, because its logits are what the request needs next."""
        if not self.prefix_caching:
            return []
        blocks: list[int] = []
        parent = b""
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            parent = chain_hash(parent, token_ids[start : start + self.block_size])
            block = self.block_of_hash.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """A request admitted with ``num_hit_tokens`` of its ``num_tokens`` found cached."""
        if self.prefix_caching:
            self.stats.queries += num_tokens
            self.stats.hits += num_hit_tokens

    def take(self, block_ids: list[int]) -> None:
        """Hold cached blocks found by :meth:`cached_prefix`."""
        for block in block_ids:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError(f"{count} KV-cache blocks asked for, {len(self.free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            evicted = self.hash_of_block.pop(block, None)
            if evicted is not None:
                del self.block_of_hash[evicted]
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: list[int]) -> None:
        """Give a request's blocks back. Its last blocks go first in the eviction order: a
        prefix is worth more than what follows it, which is only reachable through it."""
        for block in reversed(block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if block not in self.hash_of_block:
                    self.free.move_to_end(block, last=False)  # nothing to keep: hand it out first

    def cache_full_blocks(self, token_ids: list[int], block_ids: list[int], num_computed_tokens: int) -> None:
        """Make the request's full, computed blocks findable by their hash."""
        if not self.prefix_caching:
            return
        parent = b""
        for index in range(num_computed_tokens // self.block_size):
            block = block_ids[index]
            known = self.hash_of_block.get(block)
            if known is not None:
                parent = known
                continue
            parent = chain_hash(parent, token_ids[index * self.block_size : (index + 1) * self.block_size])
            if parent not in self.block_of_hash:  # else another block holds the same tokens already
                self.block_of_hash[parent] = block
                self.hash_of_block[block] = parent

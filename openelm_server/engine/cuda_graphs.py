"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step of a 3B model launches hundreds of small kernels; on a GPU the launch overhead
costs more than the math at small batches. A CUDA graph replays a captured step with one
launch. Graphs need static shapes and static input buffers, so a step here always decodes
``batch_bucket`` rows (rows past the real ones decode a dummy token into the scratch block) over
``blocks_bucket`` blocks of block table (entries past a row's own blocks point at the scratch
block and are masked). Buckets keep the padding small.

On the CPU the same static step runs eagerly (``capture=False``), which is how the tests
check that padding and masking change nothing.
"""

from __future__ import annotations

import logging
import time

import torch

from openelm_server.model.kv_cache import SCRATCH_BLOCK, KVCache
from openelm_server.model.openelm import AttentionGroup, ForwardBatch, OpenELM

log = logging.getLogger(__name__)


def _buckets(limit: int, smallest: int) -> list[int]:
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class StaticDecoder:
    def __init__(self, model: OpenELM, kv_cache: KVCache, max_rows: int, max_blocks: int, capture: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.capture = capture
        self.max_rows = max_rows
        self.device = model.transformer.token_embeddings.weight.device
        self.batch_buckets = _buckets(max_rows, 1)
        # 8 blocks of 16: short contexts attend over 128 positions, not the longest a request may have.
        self.blocks_buckets = _buckets(max_blocks, min(8, max_blocks))
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.slot_mapping = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.block_table = torch.full((max_rows, max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, rows: int, blocks: int) -> tuple[int, int]:
        batch = next(b for b in self.batch_buckets if b >= rows)
        width = next(w for w in self.blocks_buckets if w >= blocks)
        return batch, width

    def _step(self, batch: int, blocks: int) -> torch.Tensor:
        positions = self.positions[:batch]
        group = AttentionGroup.build(
            0, positions.view(batch, 1), self.block_table[:batch, :blocks], self.kv_cache.block_size
        )
        forward_batch = ForwardBatch(self.kv_cache, positions, self.slot_mapping[:batch], [group])
        return self.model.logits(self.model(self.tokens[:batch], forward_batch))

    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(tokens), vocab] for one new token per row; row i feeds ``tokens[i]`` at
        ``positions[i]`` of the sequence whose blocks are ``block_tables[i]``."""
        rows = len(tokens)
        batch, blocks = self.bucket(rows, max(len(table) for table in block_tables))
        block_size = self.kv_cache.block_size
        padding = batch - rows
        table = torch.full((batch, blocks), SCRATCH_BLOCK, dtype=torch.long)
        for row, blocks_of_row in enumerate(block_tables):
            table[row, : len(blocks_of_row)] = torch.tensor(blocks_of_row)
        slots = [t[p // block_size] * block_size + p % block_size for t, p in zip(block_tables, positions)]
        self.tokens[:batch].copy_(torch.tensor(tokens + [0] * padding), non_blocking=True)
        self.positions[:batch].copy_(torch.tensor(positions + [0] * padding), non_blocking=True)
        self.slot_mapping[:batch].copy_(torch.tensor(slots + [SCRATCH_BLOCK * block_size] * padding), non_blocking=True)
        self.block_table[:batch, :blocks].copy_(table, non_blocking=True)
        if not self.capture:
            logits = self._step(batch, blocks)
        else:
            graph, logits = self.graphs.get((batch, blocks)) or self._capture(batch, blocks)
            graph.replay()
        return logits[:rows]

    def capture_all(self) -> None:
        """Capture every bucket now, so that no request waits for a capture while it is served."""
        started = time.perf_counter()
        for batch in self.batch_buckets:
            for blocks in self.blocks_buckets:
                if (batch, blocks) not in self.graphs:
                    self._capture(batch, blocks)
        log.info(
            "captured %d CUDA graphs (batch %s x blocks %s) in %.1f s",
            len(self.graphs),
            self.batch_buckets,
            self.blocks_buckets,
            time.perf_counter() - started,
        )

    def _capture(self, batch: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as capture requires, then record the step once.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(batch, blocks)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(batch, blocks)
        self.pool = graph.pool()
        self.graphs[(batch, blocks)] = (graph, logits)
        log.debug("captured a CUDA graph for %d sequences x %d blocks", batch, blocks)
        return graph, logits

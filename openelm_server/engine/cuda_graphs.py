"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step of a 3B model launches hundreds of small kernels; on a GPU the launch overhead
costs more than the math at small batches (an eager step took 30-60 ms of CPU time on an H200's
VM, its graph 4-8 ms). A CUDA graph replays a captured step with one launch. Graphs need static
shapes and static input buffers, so a step here always computes ``batch_bucket`` rows of
``query_length`` tokens each over ``blocks_bucket`` blocks of block table. Rows past the real ones
compute dummy tokens into the scratch block; entries past a row's own blocks point at the scratch
block and are masked. Buckets keep the padding small.

Speculative decoding verifies a request's newest token and its K proposals in one step: with
``query_lengths=(1, 1 + K)`` those steps replay graphs too. A row with fewer tokens than its
bucket's query length (fewer proposals) pads with dummy tokens at its first position, whose keys
go to the scratch block, so its real tokens never see them and their outputs are dropped.

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
    def __init__(
        self,
        model: OpenELM,
        kv_cache: KVCache,
        max_rows: int,
        max_blocks: int,
        capture: bool,
        query_lengths: tuple[int, ...] = (1,),
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.capture = capture
        self.max_rows = max_rows
        self.query_lengths = sorted(set(query_lengths))
        self.max_query_length = self.query_lengths[-1]
        self.device = model.transformer.token_embeddings.weight.device
        self.batch_buckets = _buckets(max_rows, 1)
        # 8 blocks of 16: short contexts attend over 128 positions, not the longest a request may have.
        self.blocks_buckets = _buckets(max_blocks, min(8, max_blocks))
        tokens = max_rows * self.max_query_length
        self.tokens = torch.zeros(tokens, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=self.device)
        self.slot_mapping = torch.zeros(tokens, dtype=torch.long, device=self.device)
        self.block_table = torch.full((max_rows, max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, rows: int, blocks: int) -> tuple[int, int]:
        batch = next(b for b in self.batch_buckets if b >= rows)
        width = next(w for w in self.blocks_buckets if w >= blocks)
        return batch, width

    def _step(self, batch: int, length: int, blocks: int) -> torch.Tensor:
        count = batch * length
        positions = self.positions[:count]
        group = AttentionGroup.build(
            0, positions.view(batch, length), self.block_table[:batch, :blocks], self.kv_cache.block_size
        )
        forward_batch = ForwardBatch(self.kv_cache, positions, self.slot_mapping[:count], [group])
        return self.model.logits(self.model(self.tokens[:count], forward_batch))

    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(tokens), vocab] for one new token per row; row i feeds ``tokens[i]`` at
        ``positions[i]`` of the sequence whose blocks are ``block_tables[i]``."""
        return self.run([[token] for token in tokens], positions, block_tables)[:, 0]

    def run(self, token_rows: list[list[int]], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [rows, query_length, vocab]: row i feeds ``token_rows[i]`` at positions from
        ``starts[i]`` on, in the sequence whose blocks are ``block_tables[i]``; entry [i, j] is
        the logits after its j-th token (j < len(token_rows[i]); the rest is padding)."""
        rows = len(token_rows)
        length = next(q for q in self.query_lengths if q >= max(len(t) for t in token_rows))
        batch, blocks = self.bucket(rows, max(len(table) for table in block_tables))
        block_size = self.kv_cache.block_size
        scratch_slot = SCRATCH_BLOCK * block_size
        table = torch.full((batch, blocks), SCRATCH_BLOCK, dtype=torch.long)
        tokens, positions, slots = [], [], []
        for row, (row_tokens, start, blocks_of_row) in enumerate(zip(token_rows, starts, block_tables)):
            table[row, : len(blocks_of_row)] = torch.tensor(blocks_of_row)
            real = range(start, start + len(row_tokens))
            padding = length - len(row_tokens)
            tokens += row_tokens + [0] * padding
            positions += [*real] + [start] * padding
            slots += [blocks_of_row[p // block_size] * block_size + p % block_size for p in real]
            slots += [scratch_slot] * padding
        padding = (batch - rows) * length
        count = batch * length
        self.tokens[:count].copy_(torch.tensor(tokens + [0] * padding), non_blocking=True)
        self.positions[:count].copy_(torch.tensor(positions + [0] * padding), non_blocking=True)
        self.slot_mapping[:count].copy_(torch.tensor(slots + [scratch_slot] * padding), non_blocking=True)
        self.block_table[:batch, :blocks].copy_(table, non_blocking=True)
        if not self.capture:
            logits = self._step(batch, length, blocks)
        else:
            graph, logits = self.graphs.get((batch, length, blocks)) or self._capture(batch, length, blocks)
            graph.replay()
        return logits.view(batch, length, -1)[:rows]

    def capture_all(self) -> None:
        """Capture every bucket now, so that no request waits for a capture while it is served."""
        started = time.perf_counter()
        for length in self.query_lengths:
            for batch in self.batch_buckets:
                for blocks in self.blocks_buckets:
                    if (batch, length, blocks) not in self.graphs:
                        self._capture(batch, length, blocks)
        log.info(
            "captured %d CUDA graphs (batch %s x blocks %s%s) in %.1f s",
            len(self.graphs),
            self.batch_buckets,
            self.blocks_buckets,
            f" x tokens per row {self.query_lengths}" if self.max_query_length > 1 else "",
            time.perf_counter() - started,
        )

    def _capture(self, batch: int, length: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as capture requires, then record the step once.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(batch, length, blocks)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(batch, length, blocks)
        self.pool = graph.pool()
        self.graphs[(batch, length, blocks)] = (graph, logits)
        log.debug("captured a CUDA graph for %d sequences x %d tokens x %d blocks", batch, length, blocks)
        return graph, logits

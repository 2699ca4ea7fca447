"""Decode steps with static shapes, replayed as CUDA graphs.

A decode step of a 3B model launches hundreds of small kernels; on a GPU the launch overhead
costs more than the math at small batches. A CUDA graph replays a captured step with one
launch. Graphs need static shapes and static input buffers, so a step here always decodes the
first ``batch_bucket`` cache slots (row i is slot i; free slots are fed a dummy token at
position 0 of their own, unused slot) and attends over ``length_bucket`` cached positions,
masking the rest. Buckets keep the padding small.

On the CPU the same static step runs eagerly (``capture=False``), which is how the tests
check that padding and masking change nothing.
"""

from __future__ import annotations

import logging
import time

import torch

from openelm_server.model.kv_cache import KVCache
from openelm_server.model.openelm import ForwardBatch, OpenELM

log = logging.getLogger(__name__)


def _buckets(limit: int, smallest: int) -> list[int]:
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class StaticDecoder:
    def __init__(self, model: OpenELM, kv_cache: KVCache, capture: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.capture = capture
        self.device = model.transformer.token_embeddings.weight.device
        self.batch_buckets = _buckets(kv_cache.num_slots, 1)
        self.length_buckets = _buckets(kv_cache.max_length, min(128, kv_cache.max_length))
        slots = kv_cache.num_slots
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.slot_index = torch.arange(slots, device=self.device).unsqueeze(1)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        batch = next(b for b in self.batch_buckets if b >= rows)
        context = next(c for c in self.length_buckets if c >= length)
        return batch, context

    def _step(self, batch: int, context: int) -> torch.Tensor:
        positions = self.positions[:batch]
        step = ForwardBatch.build(
            self.kv_cache, list(range(batch)), positions, context_length=context, slot_index=self.slot_index[:batch]
        )
        hidden = self.model(self.tokens[:batch], step)
        return self.model.logits(hidden[:, -1])

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [len(slots), vocab] for one new token per running sequence."""
        batch, context = self.bucket(max(slots) + 1, max(positions) + 1)
        token_rows = torch.zeros(batch, 1, dtype=torch.long)
        position_rows = torch.zeros(batch, 1, dtype=torch.long)
        token_rows[slots, 0] = torch.tensor(tokens)
        position_rows[slots, 0] = torch.tensor(positions)
        self.tokens[:batch].copy_(token_rows, non_blocking=True)
        self.positions[:batch].copy_(position_rows, non_blocking=True)
        if not self.capture:
            logits = self._step(batch, context)
        else:
            graph, logits = self.graphs.get((batch, context)) or self._capture(batch, context)
            graph.replay()
        return logits[slots]

    def capture_all(self) -> None:
        """Capture every bucket now, so that no request waits for a capture while it is served."""
        started = time.perf_counter()
        for batch in self.batch_buckets:
            for context in self.length_buckets:
                if (batch, context) not in self.graphs:
                    self._capture(batch, context)
        log.info(
            "captured %d CUDA graphs (batch %s x context %s) in %.1f s",
            len(self.graphs),
            self.batch_buckets,
            self.length_buckets,
            time.perf_counter() - started,
        )

    def _capture(self, batch: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as capture requires, then record the step once.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(batch, context)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(batch, context)
        self.pool = graph.pool()
        self.graphs[(batch, context)] = (graph, logits)
        log.debug("captured a CUDA graph for %d sequences x %d positions", batch, context)
        return graph, logits

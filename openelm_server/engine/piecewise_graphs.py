"""Steps that read prompts, replayed on CUDA as graphs around eager attention.

A step with prompt chunks in it mixes sequences of many lengths, and its attention takes a
different shape every step, so no one graph can hold it (the decode graphs of cuda_graphs.py
cover steps whose rows are all short). Eagerly, the 3B model's step launched every kernel from
Python: 30-60 ms on an H200's VM whatever the step's size, so each stream paused that long
whenever a prompt was read, and a prompt's first token waited as long for each chunk.

Everything in a layer but attention works on each token alone, so such a step is cut at
attention into ``num_layers + 1`` pieces: piece 0 embeds the tokens and makes layer 0's
queries (writing its keys and values to the cache); piece k finishes layer k - 1 from its
attention's output and makes layer k's queries; the last piece finishes the last layer and
applies the final norm. Each piece is captured once per token bucket (a padded token count) as
a CUDA graph; attention runs eagerly between the pieces, over the real tokens and the groups
the runner built, exactly as in the eager forward.

Invariants:

- The pieces read and write only the static buffers below, sized for ``max_tokens``; a step of
  ``n`` tokens uses their first ``bucket >= n`` rows. ``hidden`` [max_tokens, model_dim] carries
  the residual stream between pieces (the final normed states after the last one); ``cos`` and
  ``sin`` the tokens' rotary tables, looked up once by piece 0 for every layer. ``queries``
  and ``attended`` are flat, sized for the layer with the most query heads: layer k uses their
  first ``bucket * query_heads[k] * head_dim`` elements.
- Padding tokens (rows n to bucket) are token 0 at position 0 and write their keys and values to
  the scratch block; attention never reads them (no group covers them) and nothing reads their
  rows of the buffers, so they change no real token's numbers.

Graphs are captured for every piece and bucket at start-up (``capture_all``, on CUDA); a piece
without its graph runs eagerly. So on the CPU the same pieces run eagerly, which is how the
tests check that cutting and padding change nothing.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.nn.attention import sdpa_kernel

from openelm_server.model.kv_cache import SCRATCH_BLOCK, KVCache
from openelm_server.model.openelm import ATTENTION_BACKENDS, AttentionGroup, ForwardBatch, OpenELM

log = logging.getLogger(__name__)

SMALLEST_BUCKET = 16
# Up to here buckets double. Past it they grow by multiples of it, by about a quarter of their
# size: a long step is compute-bound, and padding costs its share of the time, so long steps pad
# by at most a quarter (and at most 255 tokens up to 2,048), while a large token budget still
# makes few buckets to capture at start-up.
STEP_BUCKETS_FROM = 256


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts: 16, 32, ... 256, then every 256 tokens to 2,048, then growing by about
    a quarter, in multiples of 256; the last is ``max_tokens``."""
    sizes = []
    size = SMALLEST_BUCKET
    while size < max_tokens:
        sizes.append(size)
        if size < STEP_BUCKETS_FROM:
            size *= 2
        else:
            size += max(STEP_BUCKETS_FROM, size // 4 // STEP_BUCKETS_FROM * STEP_BUCKETS_FROM)
    return sizes + [max_tokens]


class PiecewiseStep:
    def __init__(self, model: OpenELM, kv_cache: KVCache, max_tokens: int):
        self.model = model
        self.kv_cache = kv_cache
        self.max_tokens = max_tokens
        self.buckets = token_buckets(max_tokens)
        config = model.config
        self.num_layers = config.num_layers
        device = model.transformer.token_embeddings.weight.device
        dtype = model.transformer.token_embeddings.weight.dtype
        self.tokens = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full(
            (max_tokens,), SCRATCH_BLOCK * kv_cache.block_size, dtype=torch.long, device=device
        )
        self.hidden = torch.zeros(max_tokens, config.model_dim, dtype=dtype, device=device)
        self.cos = torch.zeros(max_tokens, 1, config.head_dim, dtype=model.rope_cos.dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        widest = max(config.num_query_heads) * config.head_dim
        self.queries = torch.zeros(max_tokens * widest, dtype=dtype, device=device)
        self.attended = torch.zeros(max_tokens * widest, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(
        self, tokens: list[int], positions: list[int], slots: list[int], groups: list[AttentionGroup]
    ) -> torch.Tensor:
        """Hidden states [len(tokens), model_dim] after the final norm, as ``OpenELM.forward``
        gives them for these tokens at these positions and cache slots, attending in ``groups``."""
        count = len(tokens)
        bucket = next(b for b in self.buckets if b >= count)
        padding = bucket - count
        scratch_slot = SCRATCH_BLOCK * self.kv_cache.block_size
        self.tokens[:bucket].copy_(torch.tensor(tokens + [0] * padding), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * padding), non_blocking=True)
        self.slot_mapping[:bucket].copy_(torch.tensor(slots + [scratch_slot] * padding), non_blocking=True)
        batch = ForwardBatch(self.kv_cache, self.positions[:count], self.slot_mapping[:count], groups)
        layers = self.model.transformer.layers
        with sdpa_kernel(ATTENTION_BACKENDS):
            for piece in range(self.num_layers + 1):
                if piece > 0:  # layer piece - 1's attention, between its two pieces
                    attended = layers[piece - 1].attn.attend(self._queries(piece - 1, count), batch)
                    self._attended(piece - 1, count).copy_(attended)
                graph = self.graphs.get((bucket, piece))
                if graph is not None:
                    graph.replay()
                else:
                    self._piece(bucket, piece)
        return self.hidden[:count]

    def _queries(self, layer: int, tokens: int) -> torch.Tensor:
        heads = self.model.config.num_query_heads[layer]
        head_dim = self.model.config.head_dim
        return self.queries[: tokens * heads * head_dim].view(tokens, heads, head_dim)

    def _attended(self, layer: int, tokens: int) -> torch.Tensor:
        width = self.model.config.num_query_heads[layer] * self.model.config.head_dim
        return self.attended[: tokens * width].view(tokens, width)

    def _piece(self, bucket: int, piece: int) -> None:
        """Piece ``piece`` for ``bucket`` tokens: finish layer piece - 1, make layer piece's queries."""
        layers = self.model.transformer.layers
        hidden = self.hidden[:bucket]
        if piece == 0:
            x = self.model.transformer.token_embeddings(self.tokens[:bucket])
            cos, sin = self.model.rope(self.positions[:bucket])
            self.cos[:bucket].copy_(cos)
            self.sin[:bucket].copy_(sin)
        else:
            x = layers[piece - 1].after_attention(hidden, self._attended(piece - 1, bucket))
        if piece == self.num_layers:
            hidden.copy_(self.model.transformer.norm(x))
            return
        hidden.copy_(x)
        batch = ForwardBatch(self.kv_cache, self.positions[:bucket], self.slot_mapping[:bucket], [])
        queries = layers[piece].queries(x, (self.cos[:bucket], self.sin[:bucket]), batch)
        self._queries(piece, bucket).copy_(queries)

    def capture_all(self) -> None:
        """Capture every piece of every bucket now, so that no request waits for a capture."""
        started = time.perf_counter()
        self.slot_mapping.fill_(SCRATCH_BLOCK * self.kv_cache.block_size)  # see _capture
        for bucket in self.buckets:
            for piece in range(self.num_layers + 1):
                if (bucket, piece) not in self.graphs:
                    self._capture(bucket, piece)
        log.info(
            "captured %d CUDA graphs for steps that read prompts (%d pieces x tokens %s) in %.1f s",
            len(self.graphs),
            self.num_layers + 1,
            self.buckets,
            time.perf_counter() - started,
        )

    def _capture(self, bucket: int, piece: int) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream, as capture requires, then record the piece once. The
        # warm-up runs the piece for real: capture_all points every slot at the scratch block
        # first, so that it writes no sequence's keys.
        device = self.hidden.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._piece(bucket, piece)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._piece(bucket, piece)
        self.pool = graph.pool()
        self.graphs[(bucket, piece)] = graph
        return graph

"""Runs one step's tokens through the model: builds the batch tensors, eagerly or as a CUDA graph.

A step's tokens are laid out flat: first every row that feeds one token (decodes), attending as
one group, then each longer prompt chunk (or a decode with proposed tokens to verify) as a group
of its own. A step of decodes alone goes through the static decoder when there is one (CUDA
graphs on CUDA); a step that reads prompts, through the piecewise step when there is one (graphs
around eager attention on CUDA). Logits are computed only at the positions the caller asks for,
in one call.
"""

from __future__ import annotations

import torch

from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.piecewise_graphs import PiecewiseStep
from openelm_server.engine.scheduler import ScheduledRequest
from openelm_server.model.kv_cache import SCRATCH_BLOCK, KVCache
from openelm_server.model.openelm import AttentionGroup, ForwardBatch, OpenELM


class ModelRunner:
    def __init__(
        self,
        model: OpenELM,
        kv_cache: KVCache,
        static_decoder: StaticDecoder | None,
        piecewise: PiecewiseStep | None = None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.static_decoder = static_decoder
        self.piecewise = piecewise
        self.device = model.transformer.token_embeddings.weight.device

    def run(self, scheduled: list[ScheduledRequest], wanted: list[list[int]]) -> list[torch.Tensor]:
        """Computes the scheduled tokens; returns, per scheduled request, the logits [len(w), vocab]
        at the offsets ``w = wanted[i]`` of its tokens this step."""
        if self._static_shapes_fit(scheduled):
            logits = self.static_decoder.run(
                [s.token_ids for s in scheduled],
                [s.start for s in scheduled],
                [s.request.block_ids for s in scheduled],
            )
            # Slices where the offsets run from 0 (decodes, verify steps): views, no index kernels.
            return [logits[i, : len(w)] if w == list(range(len(w))) else logits[i, w] for i, w in enumerate(wanted)]
        decodes = [i for i, s in enumerate(scheduled) if s.num_tokens == 1]
        chunks = [i for i, s in enumerate(scheduled) if s.num_tokens > 1]
        order = decodes + chunks
        offsets: dict[int, int] = {}
        tokens: list[int] = []
        positions: list[int] = []
        for i in order:
            offsets[i] = len(tokens)
            s = scheduled[i]
            tokens += s.token_ids
            positions += range(s.start, s.start + s.num_tokens)
        block_size = self.kv_cache.block_size
        slots = []
        for i in order:
            s = scheduled[i]
            table = s.request.block_ids
            slots += [
                table[p // block_size] * block_size + p % block_size for p in range(s.start, s.start + s.num_tokens)
            ]
        position_tensor = torch.tensor(positions, device=self.device)
        groups = []
        if decodes:
            groups.append(self._group(0, [scheduled[i] for i in decodes], position_tensor[: len(decodes)].view(-1, 1)))
        for i in chunks:
            s = scheduled[i]
            start = offsets[i]
            groups.append(self._group(start, [s], position_tensor[start : start + s.num_tokens].view(1, -1)))
        if self.piecewise is not None and len(tokens) <= self.piecewise.max_tokens:
            hidden = self.piecewise.run(tokens, positions, slots, groups)
        else:
            batch = ForwardBatch(
                self.kv_cache, position_tensor, torch.tensor(slots, dtype=torch.long, device=self.device), groups
            )
            hidden = self.model(torch.tensor(tokens, device=self.device), batch)
        rows = [offsets[i] + offset for i in range(len(scheduled)) for offset in wanted[i]]
        if not rows:  # prompt chunks that end before their prompt does: no logits wanted
            return [hidden.new_empty(0, 0)] * len(scheduled)
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
        return list(logits.split([len(w) for w in wanted]))

    def _static_shapes_fit(self, scheduled: list[ScheduledRequest]) -> bool:
        """A static step holds this one: no more requests than its rows, and each computes no
        more tokens than a row holds (a decode, a verify step, a short end of a prompt)."""
        static = self.static_decoder
        return (
            static is not None
            and len(scheduled) <= static.max_rows
            and all(s.num_tokens <= static.max_query_length for s in scheduled)
        )

    def _group(self, start: int, rows: list[ScheduledRequest], positions: torch.Tensor) -> AttentionGroup:
        width = max(-(-(s.start + s.num_tokens) // self.kv_cache.block_size) for s in rows)
        table = torch.full((len(rows), width), SCRATCH_BLOCK, dtype=torch.long)
        for row, s in enumerate(rows):
            blocks = s.request.block_ids[:width]
            table[row, : len(blocks)] = torch.tensor(blocks)
        return AttentionGroup.build(start, positions, table.to(self.device), self.kv_cache.block_size)

"""Proposals for speculative decoding: tokens the model is likely to generate next, verified by it.

Two proposers. The n-gram proposer (prompt lookup) needs no second model: answers often repeat their prompt
(code edits, quotes, summaries, lists), so the tokens that followed the latest earlier
occurrence of the sequence's last few tokens are a good guess of what follows them now. A
proposal is only a guess: the engine keeps the prefix of it that the model itself would have
generated, so answers are the same with and without speculation.

The draft proposer runs a smaller model of the same vocabulary (OpenELM-270M for the 3B) with a
paged KV cache of its own, laid out by the target's block tables: the blocks a request holds
for the target hold its keys and values in the draft's cache too. ``num_draft_computed_tokens``
of a request's tokens have their draft keys and values there (the scheduler resets it when the
request loses its blocks, and rolls it back with the target's count), so each proposal first
reads what the draft has not seen yet (no more than the step's token budget in all), then
decodes K tokens greedily one by one.

Invariant: the draft writes only into blocks the scheduler allocated for this step's tokens
(positions below the request's last token + K), never beyond its block table.
"""

from __future__ import annotations

import numpy as np

from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.scheduler import ScheduledRequest

# The longest suffix looked up; shorter ones are tried when it does not occur earlier.
MAX_NGRAM = 3


def propose_ngram(token_ids: list[int], num_tokens: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the last n
    tokens of ``token_ids`` (n from ``max_ngram`` down to 1); empty if none occurs earlier."""
    if num_tokens < 1 or len(token_ids) < 2:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        # Windows starting at i cover tokens[i : i + n] with at least one token after them;
        # the suffix itself is not among them.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if matches.size:
            follow = int(matches[-1]) + n
            return token_ids[follow : follow + num_tokens]
    return []


class DraftProposer:
    def __init__(self, runner: ModelRunner):
        """``runner`` runs the draft model over its own cache, with as many blocks as the model's;
        on CUDA its one-token steps replay graphs, as the model's do."""
        self.runner = runner
        self.model = runner.model
        self.kv_cache = runner.kv_cache

    def propose(self, scheduled: list[ScheduledRequest], token_budget: int) -> list[list[int]]:
        """For each decoding request scheduled with room for ``len(draft_ids)`` proposals (their
        values are placeholders), the draft model's greedy next tokens.

        First the draft reads what it has not seen of each request: usually the newest token,
        but a whole prompt at a request's first decode (or after a preemption). It reads at most
        ``token_budget`` tokens (the step's ``--max-num-batched-tokens``) in all, shortest
        catch-ups first, so a long prompt never stalls a step more than the budget allows; a
        request that has not caught up proposes nothing this step and goes on reading the next.
        (A request that needs only its newest token is never left out: the scheduler lets
        requests speculate only while the step's decodes are fewer than the budget.)"""
        starts = [min(s.request.num_draft_computed_tokens, s.request.num_computed_tokens) for s in scheduled]
        lags = [s.request.num_tokens - start for s, start in zip(scheduled, starts)]
        reads = [0] * len(scheduled)
        left = token_budget
        for i in sorted(range(len(scheduled)), key=lags.__getitem__):
            reads[i] = min(lags[i], left)
            left -= reads[i]
        reading = [i for i in range(len(scheduled)) if reads[i]]
        ready = {i for i in reading if reads[i] == lags[i]}
        logits = self.runner.run(
            [ScheduledRequest(scheduled[i].request, starts[i], reads[i]) for i in reading],
            [[reads[i] - 1] if i in ready else [] for i in reading],
        )
        proposals: list[list[int]] = [[] for _ in scheduled]
        for i, rows in zip(reading, logits):
            scheduled[i].request.num_draft_computed_tokens = starts[i] + reads[i]
            if i in ready:
                proposals[i].append(int(rows[-1].argmax()))
        for step in range(1, max(len(s.draft_ids) for s in scheduled)):
            going = [i for i in sorted(ready) if len(scheduled[i].draft_ids) > step]
            if not going:
                break
            steps = [
                ScheduledRequest(scheduled[i].request, scheduled[i].start + step, 1, (proposals[i][-1],)) for i in going
            ]
            logits = self.runner.run(steps, [[0]] * len(steps))
            for i, row in zip(going, logits):
                proposals[i].append(int(row[-1].argmax()))
                scheduled[i].request.num_draft_computed_tokens += 1
        return proposals

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
reads what the draft has not seen yet, then decodes K tokens greedily one by one.

Invariant: the draft writes only into blocks the scheduler allocated for this step's tokens
(positions below the request's last token + K), never beyond its block table.
"""

from __future__ import annotations

import numpy as np

from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.scheduler import ScheduledRequest
from openelm_server.model.openelm import OpenELM

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
    def __init__(self, draft: OpenELM, num_blocks: int):
        self.model = draft
        self.kv_cache = draft.new_paged_kv_cache(num_blocks)
        self.runner = ModelRunner(draft, self.kv_cache, None)

    def propose(self, scheduled: list[ScheduledRequest]) -> list[list[int]]:
        """For each decoding request scheduled with room for ``len(draft_ids)`` proposals (their
        values are placeholders), the draft model's greedy next tokens."""
        catch_up = []
        for s in scheduled:
            request = s.request
            done = min(request.num_draft_computed_tokens, request.num_computed_tokens)
            catch_up.append(ScheduledRequest(request, done, request.num_tokens - done))
        logits = self.runner.run(catch_up, [[c.num_tokens - 1] for c in catch_up])
        proposals = [[int(row[-1].argmax())] for row in logits]
        for s in scheduled:
            s.request.num_draft_computed_tokens = s.request.num_tokens
        for step in range(1, max(len(s.draft_ids) for s in scheduled)):
            going = [i for i, s in enumerate(scheduled) if len(s.draft_ids) > step]
            steps = [
                ScheduledRequest(scheduled[i].request, scheduled[i].start + step, 1, (proposals[i][-1],)) for i in going
            ]
            logits = self.runner.run(steps, [[0]] * len(steps))
            for i, row in zip(going, logits):
                proposals[i].append(int(row[-1].argmax()))
                scheduled[i].request.num_draft_computed_tokens += 1
        return proposals

"""Proposals for speculative decoding: tokens the model is likely to generate next, verified by it.

The n-gram proposer (prompt lookup) needs no second model: answers often repeat their prompt
(code edits, quotes, summaries, lists), so the tokens that followed the latest earlier
occurrence of the sequence's last few tokens are a good guess of what follows them now. A
proposal is only a guess: the engine keeps the prefix of it that the model itself would have
generated, so answers are the same with and without speculation.
"""

from __future__ import annotations

import numpy as np

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

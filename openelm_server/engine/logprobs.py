"""Log-probabilities of tokens under the model's distribution, for the requests that ask.

They come from the raw logits, before penalties, logit bias, temperature or top-p/k (as vLLM
reports them by default), computed in float32 whatever the model's dtype. Rows that do not ask
cost nothing: callers pass only the rows that do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens at its position,
    as (token id, log-probability) pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """``logprobs`` [rows, vocab] (from :func:`log_softmax`); row i scores ``token_ids[i]``."""
    if not token_ids:
        return []
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    if top:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(ids, lps)) for ids, lps in zip(indices.tolist(), values.tolist())]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprob(token_id, logprob, row_top) for token_id, logprob, row_top in zip(token_ids, chosen, tops)]


def prompt_logprobs(model_logits: torch.Tensor, prompt_ids: list[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Log-probabilities of every prompt token given the tokens before it; ``model_logits`` is
    [len(prompt_ids), vocab], one row per prompt position. The first token has no context: None."""
    scored = token_logprobs(log_softmax(model_logits[:-1]), prompt_ids[1:], top)
    return (None, *scored)

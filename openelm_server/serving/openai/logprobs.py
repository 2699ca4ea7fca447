"""Log-probabilities in OpenAI's shapes: token ids from the engine become token texts here.

/v1/completions uses the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``), /v1/chat/completions the ``content[]`` list with ``bytes``.
"""

from __future__ import annotations

from openelm_server.engine.logprobs import TokenLogprob
from openelm_server.serving.gateway import Gateway

# JSON has no -inf; vLLM reports the same floor for tokens the model rules out.
LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(
    gateway: Gateway, token_ids: list[int], scored: list[TokenLogprob | None], text_offsets: list[int]
) -> dict:
    """One entry per token; a token without a score (the prompt's first) gets nulls.
    ``top_logprobs`` also lists the chosen token, as vLLM's do, so that a client can tell
    whether it was the most likely one."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, score in zip(token_ids, scored):
        text = gateway.token_text(token_id)[0]
        tokens.append(text)
        if score is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(score.logprob))
        top: dict[str, float] = {}
        for top_id, logprob in score.top:
            top.setdefault(gateway.token_text(top_id)[0], _finite(logprob))
        top.setdefault(text, _finite(score.logprob))
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offsets,
    }


def generated_logprobs(gateway: Gateway, scored: list[TokenLogprob], text_offsets: list[int], start: int) -> dict:
    """Completion logprobs of generated tokens whose text begins ``start`` characters in."""
    return completion_logprobs(
        gateway, [s.token_id for s in scored], list(scored), [start + offset for offset in text_offsets]
    )


def prompt_logprobs(
    gateway: Gateway, prompt_ids: list[int], scored: tuple[TokenLogprob | None, ...], echo: str
) -> dict:
    """Completion logprobs of the echoed prompt, offsets within ``echo``."""
    offsets = [min(offset, len(echo)) for offset in gateway.text_offsets(prompt_ids)]
    return completion_logprobs(gateway, prompt_ids, list(scored), offsets)


def join_completion_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def _top_entry(gateway: Gateway, token_id: int, logprob: float) -> dict:
    text, raw = gateway.token_text(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}


def chat_logprobs(gateway: Gateway, scored: list[TokenLogprob]) -> list[dict]:
    """Chat's ``logprobs.content``: each token with exactly ``top_logprobs`` alternatives."""
    return [
        {
            **_top_entry(gateway, s.token_id, s.logprob),
            "top_logprobs": [_top_entry(gateway, top_id, logprob) for top_id, logprob in s.top],
        }
        for s in scored
    ]

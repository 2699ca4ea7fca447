"""Per-request sampling parameters and the batched sampler.

Every row of a batch has its own parameters and, when sampling, its own seeded generator, so
that a request's output depends only on its seed, never on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from openelm_server.engine.structured import ConstrainedDecoding, OutputConstraint


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # EOS and stop strings cannot end the answer before this many tokens.
    min_tokens: int = 0
    # (token id, bias) pairs added to the logits before sampling, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # How many most likely alternatives to report with each generated token's log-probability;
    # None reports none (and costs nothing).
    logprobs: int | None = None
    # The same for every prompt token but the first (computed on all prompt positions).
    prompt_logprobs: int | None = None
    # A JSON schema the answer must follow (structured output).
    constraint: OutputConstraint | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be non-negative")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be non-negative")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be non-negative")
        if any(k is not None and k < 0 for k in (self.logprobs, self.prompt_logprobs)):
            raise ValueError("logprobs and prompt_logprobs must be non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _penalize(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    banned_token_ids: tuple[int, ...],
) -> None:
    """Penalties as users know them: repetition as in transformers (prompt and output), and
    presence/frequency as in OpenAI's API (generated tokens only); then the logit bias, and
    banned tokens out. ``logits`` is one row."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        tokens, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        logits[tokens] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[torch.tensor(ids, device=logits.device)] += torch.tensor(
            biases, dtype=logits.dtype, device=logits.device
        )
    if banned_token_ids:
        logits[torch.tensor(banned_token_ids, device=logits.device)] = float("-inf")


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens above it already reach top_p; the best always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[0] = False  # a top_p that rounds to 0 in float32 would drop it too
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    # Tokens this row may not pick at this step (EOS before min_tokens).
    banned_token_ids: tuple[int, ...] = ()
    # The grammar this row's answer follows, if any.
    constrained: ConstrainedDecoding | None = None

    @property
    def plain_greedy(self) -> bool:
        params = self.params
        return (
            params.greedy
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and not params.logit_bias
            and not self.banned_token_ids
            and self.constrained is None
        )


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """One next token per row of ``logits`` [batch, vocab]."""
    logits = logits.float()
    if all(row.plain_greedy for row in rows):
        return logits.argmax(-1).tolist()
    tokens = []
    for row_logits, row in zip(logits, rows):
        _penalize(row_logits, row.params, row.prompt_ids, row.output_ids, row.banned_token_ids)
        if row.constrained is not None:
            row.constrained.mask(row_logits)
        # A tiny repetition penalty divides logits into infinities; keep them comparable numbers.
        finfo = torch.finfo(row_logits.dtype)
        row_logits = torch.nan_to_num(row_logits, nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
        if row.params.greedy:
            tokens.append(int(row_logits.argmax()))
            continue
        # Shifted so that the best logit is 0, and the temperature kept above float32's smallest
        # normal number (1e-300 would round to 0): a tiny temperature gives -inf, never inf/nan.
        temperature = max(row.params.temperature, finfo.tiny)
        scaled = (row_logits - row_logits.max()) / temperature
        filtered = _filter_top_k_top_p(scaled, row.params.top_k, row.params.top_p)
        probabilities = filtered.softmax(-1)
        tokens.append(int(torch.multinomial(probabilities, 1, generator=row.generator)))
    return tokens

"""One request as the engine core sees it: its tokens, its sampling state, its place in the cache.

Invariants: ``status`` moves WAITING -> RUNNING -> FINISHED, or RUNNING -> PREEMPTED -> RUNNING
(a preempted request lost its cache blocks and recomputes its tokens when it runs again) and
only the scheduler changes it. ``num_computed_tokens`` of ``token_ids`` have their keys and
values in the blocks of ``block_ids``; a running request between steps always has at least one
token left to compute (the last sampled one, or the rest of its prompt).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from openelm_server.engine.logprobs import TokenLogprob
from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.structured import ConstrainedDecoding


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop string or a complete structured answer
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # the step it ran in failed


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    constrained: ConstrainedDecoding | None = None  # the grammar a structured answer follows
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Scores of every prompt token but the first, filled chunk by chunk when the request asks.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    # Speculative decoding: tokens proposed for this request, and of them the ones confirmed.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Of token_ids, how many have their keys and values in the draft model's cache (--speculative draft).
    num_draft_computed_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still to be computed (they need every prompt position's logits,
        so such a request takes nothing from the prefix cache)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

"""Which sequences run: a bounded FIFO of waiting requests admitted as cache slots free up.

The scheduler holds no tensors. Each step the engine asks it for the sequences to prefill
(oldest first, while a cache slot is free and the step's prefill token budget lasts) and for
the running batch to decode; a finished or cancelled sequence gives its slot back at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openelm_server.engine.output import IncrementalDetokenizer, StopStringMatcher
from openelm_server.engine.sampling import SamplingParams
from openelm_server.model.kv_cache import KVCache


class QueueFullError(Exception):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Any], None]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    generator: Any = None
    constrained: Any = None  # the grammar matcher of a structured answer
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def next_position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_queue: int, max_prefill_tokens: int):
        self.kv_cache = kv_cache
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def add(self, sequence: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
        self.waiting.append(sequence)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots; the first always fits a step by itself."""
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting and self.kv_cache.free_slot_count:
            candidate = self.waiting[0]
            longest_after = max(longest, len(candidate.prompt_ids))
            # Prompts are padded to the longest in a prefill batch, so that is what it costs.
            if admitted and longest_after * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            candidate.slot = self.kv_cache.allocate()
            self.running[candidate.slot] = candidate
            admitted.append(candidate)
            longest = longest_after
        return admitted

    def decode_batch(self) -> list[Sequence]:
        return [self.running[slot] for slot in sorted(self.running)]

    def finish(self, sequence: Sequence) -> None:
        if sequence.slot is not None and self.running.get(sequence.slot) is sequence:
            del self.running[sequence.slot]
            self.kv_cache.release(sequence.slot)
            sequence.slot = None

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is (waiting or running); None if it is gone."""
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                return sequence
        for sequence in self.running.values():
            if sequence.request_id == request_id:
                self.finish(sequence)
                return sequence
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

"""Which requests run at each step, and how many of their tokens: the sole owner of a request's life.

Every step computes every running request's next token (decoding) and, within the step's token
budget (``max_num_batched_tokens``), chunks of the prompts still being read: a long prompt is
read over several steps while the others keep decoding, so their streams never stall for a
whole prompt. Waiting requests are admitted oldest first while there are running places
(``max_batch_size``), budget and free blocks; a new request first takes the longest cached
prefix of its prompt. When the cache runs out mid-generation the newest running request is
preempted: it gives its blocks back, goes to the front of the queue, and recomputes its tokens
(prompt and answer so far) when it runs again; no request ever fails for lack of cache.

A decoding request may come with proposed tokens (speculative decoding): it then computes its
last token and the proposals in one step, within the budget left after one token for every
decoding request, and without them when their blocks do not fit. The engine verifies them and
rolls ``num_computed_tokens`` back over the rejected ones (:meth:`Scheduler.after_step`), so
their keys and values are never read and never enter the prefix cache.

Invariants: ``waiting`` holds WAITING and PREEMPTED requests, oldest first, preempted ones
ahead; ``running`` holds RUNNING requests in admission order; a request is in exactly one of
them until it finishes, and a finished request holds no blocks. Nothing else touches them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from openelm_server.engine.block_manager import BlockManager
from openelm_server.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    """``request`` computes its tokens [start, start + num_tokens) this step; the last
    ``len(draft_ids)`` of them are proposed tokens, not yet the request's own."""

    request: Request
    start: int
    num_tokens: int
    draft_ids: tuple[int, ...] = ()

    @property
    def completes(self) -> bool:
        """The step computes the request's last known token, so its logits give the next one."""
        return self.start + self.num_tokens - len(self.draft_ids) == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        known = self.num_tokens - len(self.draft_ids)
        return self.request.token_ids[self.start : self.start + known] + list(self.draft_ids)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request wherever it is and give its blocks back; finishing twice does nothing."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._free_blocks(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def abort(self, request_id: str) -> Request | None:
        request = self.get(request_id)
        if request is not None:
            self.finish(request, FinishReason.ABORT)
        return request

    def schedule(self, drafts: dict[Request, list[int]] | None = None) -> list[ScheduledRequest]:
        """This step's work: decodes first (oldest first), with the tokens ``drafts`` proposes
        for them where they fit, then prompt chunks, then admissions."""
        drafts = drafts or {}
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        done: set[int] = set()
        preempted = False
        by_need = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival_time))
        # Proposals take only what is left once every decoding request has its one token.
        spare = budget - sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1) if drafts else 0
        for request in by_need:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            remaining = request.num_tokens - request.num_computed_tokens
            decoding = remaining == 1
            draft = tuple(drafts.get(request, ())[: max(spare, 0)]) if decoding else ()
            if draft and self._fit(request, 1 + len(draft), True):
                scheduled.append(ScheduledRequest(request, request.num_computed_tokens, 1 + len(draft), draft))
                done.add(id(request))
                budget -= 1 + len(draft)
                spare -= len(draft)
                continue
            num_tokens = 1 if decoding else min(remaining, budget)
            if num_tokens < 1:
                continue
            while True:
                num_tokens = self._fit(request, num_tokens, decoding)
                if num_tokens:
                    break
                victim = self._newest_unscheduled(request, done)
                if victim is None:
                    break
                self._preempt(victim)
                preempted = True
            if not num_tokens:
                if decoding:  # newest of those left: it waits for blocks, recomputing later
                    self._preempt(request)
                    preempted = True
                continue
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
            done.add(id(request))
            budget -= num_tokens
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            looked_up = not request.wants_prompt_logprobs
            if looked_up:
                cached = self.block_manager.cached_prefix(request.token_ids)
                self.block_manager.take(cached)
                request.block_ids = list(cached)
                request.num_computed_tokens = len(cached) * self.block_manager.block_size
            num_tokens = self._fit(request, min(request.num_tokens - request.num_computed_tokens, budget), False)
            if not num_tokens:
                self._free_blocks(request)
                break
            if looked_up:
                self.block_manager.count_query(request.num_tokens, request.num_computed_tokens)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return scheduled

    def _fit(self, request: Request, num_tokens: int, whole: bool) -> int:
        """Allocate the blocks for ``num_tokens`` more tokens, or for as many as the free blocks
        hold (none if ``whole``); returns how many tokens got room."""
        manager = self.block_manager
        block_size = manager.block_size
        capacity = len(request.block_ids) * block_size + manager.num_free_blocks * block_size
        fitting = min(num_tokens, capacity - request.num_computed_tokens)
        if fitting < num_tokens and whole or fitting <= 0:
            return 0
        needed = manager.blocks_needed(request.block_ids, request.num_computed_tokens + fitting)
        request.block_ids += manager.allocate(needed)
        return fitting

    def _newest_unscheduled(self, request: Request, done: set[int]) -> Request | None:
        newer = [
            r for r in self.running if id(r) not in done and r is not request and r.arrival_time > request.arrival_time
        ]
        return max(newer, key=lambda r: r.arrival_time, default=None)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free_blocks(request)
        request.status = RequestStatus.PREEMPTED
        # Back in arrival order: it was admitted before anything still waiting was.
        place = next(
            (i for i, r in enumerate(self.waiting) if r.arrival_time > request.arrival_time), len(self.waiting)
        )
        self.waiting.insert(place, request)
        self.num_preemptions += 1

    def after_step(self, request: Request, scheduled: ScheduledRequest, num_rejected: int = 0) -> None:
        """The step computed the scheduled tokens, of which the last ``num_rejected`` (proposals
        the model did not confirm) hold keys and values that must never be read: they are
        computed again. The full blocks of the others join the prefix cache."""
        request.num_computed_tokens = scheduled.start + scheduled.num_tokens - num_rejected
        request.num_draft_computed_tokens = min(request.num_draft_computed_tokens, request.num_computed_tokens)
        block_size = self.block_manager.block_size
        if scheduled.start // block_size != request.num_computed_tokens // block_size:
            self.block_manager.cache_full_blocks(request.token_ids, request.block_ids, request.num_computed_tokens)

    def _free_blocks(self, request: Request) -> None:
        self.block_manager.release(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_draft_computed_tokens = 0

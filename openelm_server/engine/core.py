"""The engine core: one step is schedule -> run -> update. No threads, no locks, no text.

The caller (async_engine.py) adds and finishes requests between steps and turns the
:class:`RequestOutput` of each step into events. A step that fails raises :class:`StepError`
naming its requests, which are left as they were (their blocks still held) for the caller to
finish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from openelm_server.engine.block_manager import BlockManager
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.logprobs import TokenLogprob, log_softmax, token_logprobs
from openelm_server.engine.output import RequestOutput
from openelm_server.engine.request import FinishReason, Request
from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.sampling import SamplingRow, sample
from openelm_server.engine.scheduler import ScheduledRequest, Scheduler
from openelm_server.model.kv_cache import BLOCK_SIZE
from openelm_server.model.openelm import OpenELM

log = logging.getLogger(__name__)


class StepError(Exception):
    """A step failed; ``request_ids`` ran in it. The cause is chained."""

    def __init__(self, request_ids: list[str]):
        super().__init__(f"a step of {len(request_ids)} requests failed")
        self.request_ids = request_ids


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of them, tokens found there
    preemptions: int


class EngineCore:
    def __init__(self, model: OpenELM, config: EngineConfig, device: torch.device):
        self.model = model
        self.config = config
        self.eos_token_id = model.config.eos_token_id
        num_blocks = 1 + config.resolved_kv_cache_tokens // BLOCK_SIZE
        self.kv_cache = model.new_paged_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, BLOCK_SIZE, config.prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_size, config.resolved_max_num_batched_tokens(device.type)
        )
        static_decoder = None
        if config.cuda_graphs and device.type == "cuda":
            max_blocks = -(-config.max_model_len // BLOCK_SIZE)
            static_decoder = StaticDecoder(model, self.kv_cache, config.max_batch_size, max_blocks, capture=True)
            with torch.inference_mode():
                static_decoder.capture_all()
        self.runner = ModelRunner(model, self.kv_cache, static_decoder)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request wherever it is; None if it is not here (finished already)."""
        request = self.scheduler.get(request_id)
        if request is not None:
            self.scheduler.finish(request, reason)
        return request

    def unfinished(self) -> list[Request]:
        return [*self.scheduler.running, *self.scheduler.waiting]

    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            len(self.scheduler.waiting),
            len(self.scheduler.running),
            manager.num_used_blocks,
            manager.num_usable_blocks,
            manager.stats.queries,
            manager.stats.hits,
            self.scheduler.num_preemptions,
        )

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        wanted = [self._logit_offsets(s) for s in scheduled]
        try:
            with torch.inference_mode():
                logits = self.runner.run(scheduled, wanted)
                return self._update(scheduled, logits)
        except Exception as error:
            raise StepError([s.request.request_id for s in scheduled]) from error

    def _logit_offsets(self, scheduled: ScheduledRequest) -> list[int]:
        """Which of the step's tokens need logits: the prompt positions whose logprobs are still
        to be reported, and the last one when it gives the next token."""
        request = scheduled.request
        offsets = []
        if request.wants_prompt_logprobs:
            # Logits at position k - 1 score prompt token k (k >= 1).
            first = max(len(request.prompt_logprobs) + 1, scheduled.start + 1)
            last = min(scheduled.start + scheduled.num_tokens, len(request.prompt_ids) - 1)
            offsets += [k - 1 - scheduled.start for k in range(first, last + 1)]
        if scheduled.completes and request.params.max_new_tokens > 0:
            offsets.append(scheduled.num_tokens - 1)
        return offsets

    def _update(self, scheduled: list[ScheduledRequest], logits: list[torch.Tensor]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        sampling: list[tuple[Request, torch.Tensor]] = []
        for s, rows in zip(scheduled, logits):
            request = s.request
            if request.wants_prompt_logprobs:
                first = len(request.prompt_logprobs) + 1
                count = min(s.start + s.num_tokens, len(request.prompt_ids) - 1) - first + 1
                if count > 0:
                    request.prompt_logprobs += token_logprobs(
                        log_softmax(rows[:count]),
                        request.prompt_ids[first : first + count],
                        request.params.prompt_logprobs,
                    )
            self.scheduler.after_step(request, s)
            if not s.completes:
                continue
            if request.params.max_new_tokens == 0:  # an echo of the prompt's logprobs, nothing generated
                self.scheduler.finish(request, FinishReason.LENGTH)
                outputs.append(self._output(request, ()))
            else:
                sampling.append((request, rows[-1]))
        if sampling:
            outputs += self._sample(sampling)
        return outputs

    def _sample(self, sampling: list[tuple[Request, torch.Tensor]]) -> list[RequestOutput]:
        requests = [request for request, _ in sampling]
        logits = torch.stack([row for _, row in sampling])
        rows = [
            SamplingRow(r.params, r.prompt_ids, r.output_ids, r.generator, self._banned_token_ids(r), r.constrained)
            for r in requests
        ]
        asking = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        # Taken before sampling, which adjusts the logits in place.
        scored = log_softmax(logits[asking]) if asking else None
        tokens = sample(logits, rows)
        logprobs: list[tuple[TokenLogprob, ...]] = [()] * len(requests)
        if asking:
            top = max(requests[i].params.logprobs for i in asking)
            for i, logprob in zip(asking, token_logprobs(scored, [tokens[i] for i in asking], top)):
                wanted = requests[i].params.logprobs
                logprobs[i] = (TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[:wanted]),)
        outputs = []
        for request, token, token_logprob in zip(requests, tokens, logprobs):
            request.output_ids.append(token)
            if request.constrained is not None:
                request.constrained.accept(token)
            reason = self._finish_reason(request, token)
            if reason is not None:
                self.scheduler.finish(request, reason)
            outputs.append(self._output(request, (token,), token_logprob))
        return outputs

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token == self.eos_token_id and not params.ignore_eos:
            return FinishReason.STOP
        if len(request.output_ids) >= params.max_new_tokens:
            return FinishReason.LENGTH
        if request.constrained is not None and request.constrained.complete:
            return FinishReason.STOP  # the structured answer is whole: nothing more may follow
        return None

    def _banned_token_ids(self, request: Request) -> tuple[int, ...]:
        """EOS may not end an answer shorter than its min_tokens."""
        if len(request.output_ids) < request.params.min_tokens and not request.params.ignore_eos:
            return (self.eos_token_id,)
        return ()

    def _output(
        self, request: Request, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...] = ()
    ) -> RequestOutput:
        first = len(request.output_ids) <= 1
        scored_prompt = None
        if first and request.params.prompt_logprobs is not None:
            scored_prompt = (None, *request.prompt_logprobs)
        return RequestOutput(
            request.request_id,
            token_ids,
            len(request.prompt_ids),
            len(request.output_ids),
            request.finish_reason if request.is_finished else None,
            logprobs,
            scored_prompt,
        )

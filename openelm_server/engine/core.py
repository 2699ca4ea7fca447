"""The engine core: one step is schedule -> run -> update. No threads, no locks, no text.

The caller (async_engine.py) adds and finishes requests between steps and turns the
:class:`RequestOutput` of each step into events. A step that fails raises :class:`StepError`
naming its requests, which are left as they were (their blocks still held) for the caller to
finish.

Speculative decoding (``speculative="ngram"`` or ``"draft"``, see speculative.py): a decoding
request that is greedy (temperature 0) gets up to ``num_speculative_tokens`` proposed tokens,
computed with its last token in one step; the logits at each of those positions are sampled
exactly as a plain step would sample them (penalties and min_tokens applied to the answer as it
would be by then), the proposals are kept while they equal what the model picks, and the
model's own pick follows the last kept one: each step adds 1 to K + 1 tokens, the very tokens a
step-by-step decode would add, stopping where it would stop (EOS, max_new_tokens). Sampled
requests, requests asking for logprobs or prompt logprobs, and structured answers (whose
grammar advances token by token) never speculate: their steps are as without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass

import torch

from openelm_server.engine.block_manager import BlockManager
from openelm_server.engine.config import EngineConfig
from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.logprobs import TokenLogprob, log_softmax, token_logprobs
from openelm_server.engine.output import RequestOutput
from openelm_server.engine.piecewise_graphs import PiecewiseStep
from openelm_server.engine.request import FinishReason, Request
from openelm_server.engine.runner import ModelRunner
from openelm_server.engine.sampling import SamplingRow, sample
from openelm_server.engine.scheduler import ScheduledRequest, Scheduler
from openelm_server.engine.speculative import DraftProposer, propose_ngram
from openelm_server.model.kv_cache import BLOCK_SIZE, KVCache
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
    spec_draft_tokens: int  # tokens proposed for verification (speculative decoding)
    spec_accepted_tokens: int  # of them, tokens the model confirmed


class EngineCore:
    def __init__(self, model: OpenELM, config: EngineConfig, device: torch.device, draft: OpenELM | None = None):
        if (config.speculative == "draft") != (draft is not None):
            raise ValueError("speculative='draft' needs a draft model, and a draft model needs speculative='draft'")
        if draft is not None and draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the model's "
                f"{model.config.vocab_size}: a draft must share the model's tokenizer"
            )
        self.model = model
        self.config = config
        self.eos_token_id = model.config.eos_token_id
        num_blocks = 1 + config.resolved_kv_cache_tokens // BLOCK_SIZE
        self.kv_cache = model.new_paged_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, BLOCK_SIZE, config.prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_size, config.resolved_max_num_batched_tokens(device.type)
        )
        graphs = config.cuda_graphs and device.type == "cuda"
        # Verifying proposals computes the newest token and up to K proposed ones per request.
        query_lengths = (1,) if config.speculative == "none" else (1, 1 + config.num_speculative_tokens)
        self.runner = self._runner(model, self.kv_cache, query_lengths, graphs)
        self.draft_proposer = None
        if draft is not None:
            self.draft_proposer = DraftProposer(self._runner(draft, draft.new_paged_kv_cache(num_blocks), (1,), graphs))
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def _runner(self, model: OpenELM, kv_cache: KVCache, query_lengths: tuple[int, ...], graphs: bool) -> ModelRunner:
        """A runner for ``model``; with ``graphs``, its decode steps and the per-token parts of its
        other steps (up to the step's token budget) replay CUDA graphs, captured here."""
        if not graphs:
            return ModelRunner(model, kv_cache, None)
        max_blocks = -(-self.config.max_model_len // BLOCK_SIZE)
        decoder = StaticDecoder(model, kv_cache, self.config.max_batch_size, max_blocks, True, query_lengths)
        piecewise = PiecewiseStep(model, kv_cache, self.scheduler.max_num_batched_tokens)
        with torch.inference_mode():
            decoder.capture_all()
            piecewise.capture_all()
        return ModelRunner(model, kv_cache, decoder, piecewise)

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
            self.num_draft_tokens,
            self.num_accepted_tokens,
        )

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule(self._drafts())
        if not scheduled:
            return []
        try:
            with torch.inference_mode():
                if self.draft_proposer is not None:
                    scheduled = self._with_draft_proposals(scheduled)
                wanted = [self._logit_offsets(s) for s in scheduled]
                logits = self.runner.run(scheduled, wanted)
                return self._update(scheduled, logits)
        except Exception as error:
            raise StepError([s.request.request_id for s in scheduled]) from error

    def _drafts(self) -> dict[Request, list[int]]:
        """Proposed next tokens of the decoding requests that speculate, never more than their
        max_new_tokens leaves room for after the model's own next token."""
        if self.config.speculative == "none":
            return {}
        drafts = {}
        for request in self.scheduler.running:
            if request.num_tokens - request.num_computed_tokens != 1 or not self._speculates(request):
                continue
            room = min(self.config.num_speculative_tokens, request.params.max_new_tokens - len(request.output_ids) - 1)
            # The draft model proposes once the step's blocks are there: room is held for it.
            draft = [0] * max(room, 0) if self.draft_proposer is not None else propose_ngram(request.token_ids, room)
            if draft:
                drafts[request] = draft
        return drafts

    def _with_draft_proposals(self, scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
        speculating = [s for s in scheduled if s.draft_ids]
        if not speculating:
            return scheduled
        proposals = iter(self.draft_proposer.propose(speculating, self.scheduler.max_num_batched_tokens))
        with_proposals = []
        for s in scheduled:
            if s.draft_ids:
                # Empty while the draft is still reading the request's prompt: the step is its one token.
                proposed = tuple(next(proposals))
                s = dataclasses.replace(s, draft_ids=proposed, num_tokens=1 + len(proposed))
            with_proposals.append(s)
        return with_proposals

    @staticmethod
    def _speculates(request: Request) -> bool:
        params = request.params
        return (
            params.greedy and params.logprobs is None and params.prompt_logprobs is None and request.constrained is None
        )

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
            # The last known token's, then each proposal's: the model's pick after each of them.
            offsets += range(scheduled.num_tokens - 1 - len(scheduled.draft_ids), scheduled.num_tokens)
        return offsets

    def _update(self, scheduled: list[ScheduledRequest], logits: list[torch.Tensor]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        sampling: list[tuple[ScheduledRequest, torch.Tensor]] = []
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
            if not s.completes:
                self.scheduler.after_step(request, s)
                continue
            if request.params.max_new_tokens == 0:  # an echo of the prompt's logprobs, nothing generated
                self.scheduler.after_step(request, s)
                self.scheduler.finish(request, FinishReason.LENGTH)
                outputs.append(self._output(request, ()))
            else:
                sampling.append((s, rows[-1 - len(s.draft_ids) :]))  # after the prompt logprobs' rows
        if sampling:
            outputs += self._sample(sampling)
        return outputs

    def _sample(self, sampling: list[tuple[ScheduledRequest, torch.Tensor]]) -> list[RequestOutput]:
        """The next token of each request, or, where it speculates, the tokens its proposals
        and the model agree on plus the model's own next one. One row per logits position:
        row i of a request is sampled as if its first i proposals had been generated."""
        rows: list[SamplingRow] = []
        for s, _ in sampling:
            r = s.request
            for i in range(len(s.draft_ids) + 1):
                output_ids = r.output_ids + list(s.draft_ids[:i])
                banned = self._banned_token_ids(r, len(output_ids))
                rows.append(SamplingRow(r.params, r.prompt_ids, output_ids, r.generator, banned, r.constrained))
        logits = torch.cat([rows_of_one for _, rows_of_one in sampling])
        # Requests asking for logprobs never speculate: one row each.
        first_rows = list(itertools.accumulate((len(s.draft_ids) + 1 for s, _ in sampling), initial=0))
        asking = [first_rows[i] for i, (s, _) in enumerate(sampling) if s.request.params.logprobs is not None]
        # Taken before sampling, which adjusts the logits in place.
        scored = log_softmax(logits[asking]) if asking else None
        tokens = sample(logits, rows)
        logprobs: dict[int, tuple[TokenLogprob, ...]] = {}
        if asking:
            top = max(rows[i].params.logprobs for i in asking)
            for i, logprob in zip(asking, token_logprobs(scored, [tokens[i] for i in asking], top)):
                wanted = rows[i].params.logprobs
                logprobs[i] = (TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[:wanted]),)
        outputs = []
        for (s, _), first in zip(sampling, first_rows):
            request = s.request
            new_tokens: list[int] = []
            reason = None
            for i, token in enumerate(tokens[first : first + len(s.draft_ids) + 1]):
                new_tokens.append(token)
                request.output_ids.append(token)
                if request.constrained is not None:
                    request.constrained.accept(token)
                reason = self._finish_reason(request, token)
                if reason is not None or i == len(s.draft_ids) or token != s.draft_ids[i]:
                    break
            # The inputs computed after the last token kept are the rejected proposals.
            self.scheduler.after_step(request, s, len(s.draft_ids) - (len(new_tokens) - 1))
            if s.draft_ids:
                accepted = sum(
                    1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(new_tokens, s.draft_ids))
                )
                request.num_draft_tokens += len(s.draft_ids)
                request.num_accepted_tokens += accepted
                self.num_draft_tokens += len(s.draft_ids)
                self.num_accepted_tokens += accepted
            if reason is not None:
                self.scheduler.finish(request, reason)
            outputs.append(self._output(request, tuple(new_tokens), logprobs.get(first, ())))
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

    def _banned_token_ids(self, request: Request, num_output_tokens: int) -> tuple[int, ...]:
        """EOS may not end an answer shorter than its min_tokens."""
        if num_output_tokens < request.params.min_tokens and not request.params.ignore_eos:
            return (self.eos_token_id,)
        return ()

    def _output(
        self, request: Request, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...] = ()
    ) -> RequestOutput:
        first = len(request.output_ids) <= len(token_ids)
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
            request.num_draft_tokens,
            request.num_accepted_tokens,
        )

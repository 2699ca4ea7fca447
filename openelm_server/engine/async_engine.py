"""The engine: owns the model, runs the step loop in its own thread, streams tokens out.

Continuous batching: at every step waiting requests are admitted into free cache slots and
prefilled, then every running sequence decodes one token together. A finished or cancelled
sequence leaves at once and its slot serves the next request. The engine knows nothing of
HTTP: callers get an async iterator of :class:`GenerationEvent`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass

import torch

from openelm_server.engine.config import EngineConfig
from openelm_server.engine.cuda_graphs import StaticDecoder
from openelm_server.engine.logprobs import TokenLogprob, log_softmax, prompt_logprobs, token_logprobs
from openelm_server.engine.output import IncrementalDetokenizer, StopStringMatcher
from openelm_server.engine.sampling import SamplingParams, SamplingRow, new_generator, sample
from openelm_server.engine.scheduler import QueueFullError, Scheduler, Sequence
from openelm_server.engine.structured import Grammars
from openelm_server.model.openelm import ForwardBatch, OpenELM

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineError", "GenerationEvent", "QueueFullError", "RequestStream"]


class EngineError(Exception):
    """A generation failed inside the engine; ``retryable`` failures (out of memory) may
    succeed if sent again."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class GenerationEvent:
    """What one step did for one request: new text, new tokens, and whether it is over.

    ``logprobs`` has one entry per token of ``token_ids`` when the request asked for them;
    ``prompt_logprobs`` comes with the first event when asked (None for the first prompt token,
    which has no context)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: EngineError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_slots_used: int
    kv_slots_total: int


class _AsyncSink:
    """Hands events from the engine thread to one request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    def __call__(self, event: GenerationEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the caller's loop has closed; nobody is left to read


class RequestStream:
    """Events of one request until it finishes. ``cancel()`` (or closing the stream early)
    stops the generation and frees its cache slot at the next step."""

    def __init__(self, engine: Engine, request_id: str, sink: _AsyncSink):
        self.engine = engine
        self.request_id = request_id
        self._sink = sink
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self.finished:
            raise StopAsyncIteration
        event = await self._sink.queue.get()
        self.finished = event.finish_reason is not None or event.error is not None
        return event

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class Engine:
    def __init__(self, model: OpenELM, tokenizer, config: EngineConfig):
        if config.max_model_len > model.config.max_context_length:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context of {model.config.max_context_length}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id = model.config.eos_token_id
        self.device = model.transformer.token_embeddings.weight.device
        self.kv_cache = model.new_kv_cache(config.max_batch_size, config.max_model_len)
        self.scheduler = Scheduler(self.kv_cache, config.max_queue, config.max_prefill_tokens)
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.static_decoder = StaticDecoder(model, self.kv_cache, capture=True) if use_graphs else None
        if self.static_decoder is not None:
            with torch.inference_mode():
                self.static_decoder.capture_all()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._aborted: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        log.info(
            "KV cache: %d slots x %d tokens, %.1f MiB on %s; decode %s",
            config.max_batch_size,
            config.max_model_len,
            self.kv_cache.nbytes / 2**20,
            self.device,
            "with CUDA graphs" if use_graphs else "eager",
        )

    # ---- called from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                len(self.scheduler.waiting),
                len(self.scheduler.running),
                self.kv_cache.used_slot_count,
                self.kv_cache.num_slots,
            )

    def submit(self, prompt_ids: list[int], params: SamplingParams, deliver, request_id: str | None = None) -> str:
        """Queue a request; ``deliver`` gets its events on the engine thread. Raises
        :class:`QueueFullError` when the waiting queue is full and ``ValueError`` when the
        request cannot fit the context or its output constraint cannot be followed."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(prompt_ids) + params.max_new_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the context of {self.config.max_model_len} tokens"
            )
        request_id = request_id or uuid.uuid4().hex
        sequence = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            deliver=deliver,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop_matcher=StopStringMatcher(params.stop),
            generator=None if params.greedy else new_generator(params.seed, self.device),
            constrained=None if params.constraint is None else self.grammars.matcher(params.constraint),
        )
        with self._lock:
            self.scheduler.add(sequence)
            self._aborted.discard(request_id)
        self._wakeup.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is free at the next step."""
        with self._lock:
            self._aborted.add(request_id)
        self._wakeup.set()

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request now (so that a full queue or an oversized request raises here,
        before any answer is sent) and return the async iterator of its events."""
        sink = _AsyncSink(asyncio.get_running_loop())
        request_id = self.submit(prompt_ids, params, sink, request_id)
        return RequestStream(self, request_id, sink)

    # ---- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while not self._stopping:
            with self._lock:
                self._apply_aborts()
                admitted = self.scheduler.admit()
                has_work = self.scheduler.has_work
            if not has_work:
                if busy:
                    self._release_cached_memory()
                    busy = False
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            busy = True
            if admitted:
                self._guarded_step(admitted, self._prefill)
            with self._lock:
                self._apply_aborts()
                batch = self.scheduler.decode_batch()
            if batch:
                self._guarded_step(batch, self._decode)
        with self._lock:
            leftovers = list(self.scheduler.waiting) + self.scheduler.decode_batch()
        self._fail(leftovers, EngineError("the server is shutting down", retryable=True))

    def _apply_aborts(self) -> None:
        for request_id in self._aborted:
            self.scheduler.remove(request_id)
        self._aborted.clear()

    def _guarded_step(self, sequences: list[Sequence], step) -> None:
        """Run a step; if it fails, fail its requests and keep serving the others."""
        try:
            with torch.inference_mode():
                step(sequences)
        except torch.cuda.OutOfMemoryError:
            log.error("out of memory in a step of %d sequences; failing them and going on", len(sequences))
            self._fail(sequences, EngineError("the server ran out of GPU memory; retry later", retryable=True))
            self._release_cached_memory()
        except Exception:
            log.exception("a step of %d sequences failed", len(sequences))
            self._fail(sequences, EngineError("internal error during generation"))

    def _fail(self, sequences: list[Sequence], error: EngineError) -> None:
        with self._lock:
            for sequence in sequences:
                self.scheduler.finish(sequence)
                if sequence in self.scheduler.waiting:
                    self.scheduler.waiting.remove(sequence)
        for sequence in sequences:
            sequence.deliver(GenerationEvent("", (), len(sequence.prompt_ids), len(sequence.output_ids), error=error))

    def _release_cached_memory(self) -> None:
        # The tutorial emptied the CUDA cache after every call; doing it only when idle keeps
        # that promise without slowing a batch.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()

    def _prefill(self, sequences: list[Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in sequences]
        longest = max(lengths)
        tokens = torch.zeros(len(sequences), longest, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            tokens[row, : lengths[row]] = torch.tensor(sequence.prompt_ids)
        positions = torch.arange(longest).expand(len(sequences), longest).to(self.device)
        step = ForwardBatch.build(self.kv_cache, [s.slot for s in sequences], positions)
        hidden = self.model(tokens.to(self.device), step)
        # Logits at every prompt position only for the requests that want prompt logprobs;
        # the others need the last position alone.
        scored_prompts = {
            row: prompt_logprobs(
                self.model.logits(hidden[row, : lengths[row]]), sequence.prompt_ids, sequence.params.prompt_logprobs
            )
            for row, sequence in enumerate(sequences)
            if sequence.params.prompt_logprobs is not None
        }
        generating = [row for row, sequence in enumerate(sequences) if sequence.params.max_new_tokens > 0]
        for row, sequence in enumerate(sequences):
            if sequence.params.max_new_tokens == 0:  # echo of the prompt's logprobs, nothing generated
                with self._lock:
                    self.scheduler.finish(sequence)
                sequence.deliver(
                    GenerationEvent("", (), lengths[row], 0, "length", prompt_logprobs=scored_prompts.get(row))
                )
        if generating:
            rows = torch.tensor(generating, device=self.device)
            last = hidden[rows, torch.tensor([lengths[row] - 1 for row in generating], device=self.device)]
            self._sample_and_emit(
                [sequences[row] for row in generating],
                self.model.logits(last),
                [scored_prompts.get(row) for row in generating],
            )

    def _decode(self, sequences: list[Sequence]) -> None:
        slots = [s.slot for s in sequences]
        tokens = [s.output_ids[-1] for s in sequences]
        positions = [s.next_position for s in sequences]
        if self.static_decoder is not None:
            logits = self.static_decoder.decode(slots, tokens, positions)
        else:
            step = ForwardBatch.build(self.kv_cache, slots, torch.tensor(positions, device=self.device).unsqueeze(1))
            hidden = self.model(torch.tensor(tokens, device=self.device).unsqueeze(1), step)
            logits = self.model.logits(hidden[:, -1])
        self._sample_and_emit(sequences, logits)

    def _sample_and_emit(
        self, sequences: list[Sequence], logits: torch.Tensor, scored_prompts: list | None = None
    ) -> None:
        rows = [
            SamplingRow(s.params, s.prompt_ids, s.output_ids, s.generator, self._banned_token_ids(s), s.constrained)
            for s in sequences
        ]
        asking = [row for row, s in enumerate(sequences) if s.params.logprobs is not None]
        # Taken before sampling, which adjusts the logits in place.
        scored = log_softmax(logits[asking]) if asking else None
        tokens = sample(logits, rows)
        logprobs: list[tuple[TokenLogprob, ...]] = [()] * len(sequences)
        if asking:
            top = max(sequences[row].params.logprobs for row in asking)
            for row, logprob in zip(asking, token_logprobs(scored, [tokens[row] for row in asking], top)):
                wanted = sequences[row].params.logprobs
                logprobs[row] = (TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[:wanted]),)
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            self._emit(sequence, token, logprobs[row], scored_prompts[row] if scored_prompts else None)

    def _banned_token_ids(self, sequence: Sequence) -> tuple[int, ...]:
        """EOS may not end an answer shorter than its min_tokens."""
        if len(sequence.output_ids) < sequence.params.min_tokens and not sequence.params.ignore_eos:
            return (self.eos_token_id,)
        return ()

    def _emit(
        self, sequence: Sequence, token: int, logprobs: tuple[TokenLogprob, ...], scored_prompt: tuple | None
    ) -> None:
        sequence.output_ids.append(token)
        params = sequence.params
        finish_reason = None
        may_stop = len(sequence.output_ids) >= params.min_tokens
        if sequence.constrained is not None:
            sequence.constrained.accept(token)
        if token == self.eos_token_id and not params.ignore_eos:
            finish_reason = "stop"
            text = sequence.stop_matcher.add(sequence.detokenizer.flush())
        else:
            text = sequence.stop_matcher.add(sequence.detokenizer.push(token), may_stop)
            if len(sequence.output_ids) >= params.max_new_tokens and not sequence.stop_matcher.stopped:
                finish_reason = "length"
                text += sequence.stop_matcher.add(sequence.detokenizer.flush())
        if sequence.stop_matcher.stopped:
            finish_reason = "stop"
        elif finish_reason is None and sequence.constrained is not None and sequence.constrained.complete:
            finish_reason = "stop"  # the structured answer is whole: nothing more may follow
            text += sequence.stop_matcher.add(sequence.detokenizer.flush())
        if finish_reason is not None:
            text += sequence.stop_matcher.finish()
            with self._lock:
                self.scheduler.finish(sequence)
        sequence.deliver(
            GenerationEvent(
                text,
                (token,),
                len(sequence.prompt_ids),
                len(sequence.output_ids),
                finish_reason,
                logprobs=logprobs,
                prompt_logprobs=scored_prompt,
            )
        )

"""The engine as the server uses it: the core's step loop in its own thread, streams of events out.

Callers on any thread put commands (add a request, abort one) into an inbox; only the engine
thread touches the core, between steps, so the core needs no lock. Continuous batching happens
in the core: each step decodes every running request and reads prompt chunks of new ones, and a
finished or cancelled request leaves at once. Error policy: a failed step fails the requests
that ran in it (out of memory as retryable) and the engine goes on serving the others. The
engine knows nothing of HTTP: callers get an async iterator of :class:`GenerationEvent`.

Invariant: the numbers ``stats()`` returns, and the queue limit, count a request as waiting from
``submit`` until the core schedules it, whether or not the engine thread has read the inbox yet.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openelm_server.engine.config import EngineConfig
from openelm_server.engine.core import EngineCore, EngineStats, StepError
from openelm_server.engine.host_memory import release_free_host_memory
from openelm_server.engine.output import EngineError, GenerationEvent, OutputBuilder, RequestOutput
from openelm_server.engine.request import FinishReason, Request
from openelm_server.engine.sampling import SamplingParams, new_generator
from openelm_server.engine.structured import Grammars
from openelm_server.model.kv_cache import BLOCK_SIZE
from openelm_server.model.openelm import OpenELM

log = logging.getLogger(__name__)

# While busy, the C heap's free pages go back this often (each time about 1 ms); when it goes idle, at once.
HOST_MEMORY_RELEASE_SECONDS = 10.0


class QueueFullError(Exception):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass(frozen=True)
class _Add:
    request: Request
    deliver: Callable[[GenerationEvent], None]


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Stream:
    """Where one request's events go, and its text so far."""

    request: Request
    deliver: Callable[[GenerationEvent], None]
    builder: OutputBuilder


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
    stops the generation and frees its cache blocks at the next step."""

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
    def __init__(self, model: OpenELM, tokenizer, config: EngineConfig, draft: OpenELM | None = None):
        if config.max_model_len > model.config.max_context_length:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context of {model.config.max_context_length}"
            )
        if config.resolved_kv_cache_tokens < config.max_model_len:
            raise ValueError(
                f"kv_cache_tokens {config.resolved_kv_cache_tokens} is less than max_model_len {config.max_model_len}: "
                "a request of the full length could never run"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id = model.config.eos_token_id
        self.device = model.transformer.token_embeddings.weight.device
        self.core = EngineCore(model, config, self.device, draft)
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        # Guards only the published numbers below, never the core.
        self._stats_lock = threading.Lock()
        self._unread_adds = 0
        self._stats = self.core.stats()
        self._stopping = False
        self._thread: threading.Thread | None = None
        log.info(
            "KV cache: %d tokens (%d blocks of %d), %.1f MiB on %s%s; up to %d requests at once, "
            "%d tokens per step; prefix caching %s; decode %s; speculative decoding %s",
            (self.core.kv_cache.num_blocks - 1) * BLOCK_SIZE,
            self.core.kv_cache.num_blocks - 1,
            BLOCK_SIZE,
            self.core.kv_cache.nbytes / 2**20,
            self.device,
            ""
            if self.core.draft_proposer is None
            else f", plus {self.core.draft_proposer.kv_cache.nbytes / 2**20:.1f} MiB in the draft model's cache",
            config.max_batch_size,
            self.core.scheduler.max_num_batched_tokens,
            "on" if config.prefix_caching else "off",
            "with CUDA graphs" if self.core.runner.static_decoder is not None else "eager",
            "off" if config.speculative == "none" else f"{config.speculative}, {config.num_speculative_tokens} tokens",
        )

    # ---- called from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> EngineStats:
        with self._stats_lock:
            stats = self._stats
            return EngineStats(**{**stats.__dict__, "waiting": stats.waiting + self._unread_adds})

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        deliver: Callable[[GenerationEvent], None],
        request_id: str | None = None,
    ) -> str:
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
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            params=params,
            generator=None if params.greedy else new_generator(params.seed, self.device),
            constrained=None if params.constraint is None else self.grammars.matcher(params.constraint),
        )
        with self._stats_lock:
            waiting = self._stats.waiting + self._unread_adds
            if waiting >= self.config.max_queue:
                raise QueueFullError(f"{waiting} requests are already waiting (--max-queue {self.config.max_queue})")
            self._unread_adds += 1
        self._inbox.put(_Add(request, deliver))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are free at the next step."""
        self._inbox.put(_Abort(request_id))

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request now (so that a full queue or an oversized request raises here,
        before any answer is sent) and return the async iterator of its events."""
        sink = _AsyncSink(asyncio.get_running_loop())
        request_id = self.submit(prompt_ids, params, sink, request_id)
        return RequestStream(self, request_id, sink)

    # ---- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        next_host_release = time.monotonic() + HOST_MEMORY_RELEASE_SECONDS
        while not self._stopping:
            if busy and not self.core.has_work:
                self._release_cached_memory()
                busy = False
            elif busy and time.monotonic() >= next_host_release:
                release_free_host_memory()
                next_host_release = time.monotonic() + HOST_MEMORY_RELEASE_SECONDS
            self._read_inbox(wait=not self.core.has_work)
            if not self.core.has_work:
                continue
            busy = True
            try:
                outputs = self.core.step()
            except StepError as failure:
                self._fail_step(failure)
                outputs = []
            self._publish_stats(0)  # before the events: a client that got its last one sees the blocks freed
            for output in outputs:
                self._deliver(output)
        self._read_inbox(wait=False)
        error = EngineError("the server is shutting down", retryable=True)
        for request in self.core.unfinished():
            self._fail(request.request_id, error)
        self._publish_stats(0)

    def _read_inbox(self, wait: bool) -> None:
        adds = 0
        try:
            command = self._inbox.get(timeout=0.5) if wait else self._inbox.get_nowait()
            while True:
                if isinstance(command, _Add):
                    adds += 1
                    request = command.request
                    builder = OutputBuilder(self.tokenizer, request.prompt_ids, request.params, self.eos_token_id)
                    self._streams[request.request_id] = _Stream(request, command.deliver, builder)
                    self.core.add_request(request)
                elif isinstance(command, _Abort):
                    self.core.finish(command.request_id, FinishReason.ABORT)
                    self._streams.pop(command.request_id, None)
                    self._publish_stats(0)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if adds:
            self._publish_stats(adds)

    def _publish_stats(self, adds_read: int) -> None:
        stats = self.core.stats()
        with self._stats_lock:
            self._unread_adds -= adds_read
            self._stats = stats

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        event = stream.builder.build(output)
        if stream.builder.stopped and output.finish_reason is None:
            self.core.finish(output.request_id, FinishReason.STOP)
            self._publish_stats(0)
        if event.finish_reason is not None:
            del self._streams[output.request_id]
        stream.deliver(event)

    def _fail_step(self, failure: StepError) -> None:
        cause = failure.__cause__
        count = len(failure.request_ids)
        if isinstance(cause, torch.cuda.OutOfMemoryError):
            log.error("out of memory in a step of %d sequences; failing them and going on", count)
            error = EngineError("the server ran out of GPU memory; retry later", retryable=True)
            self._release_cached_memory()
        else:
            log.error("a step of %d sequences failed", count, exc_info=cause)
            error = EngineError("internal error during generation")
        for request_id in failure.request_ids:
            self._fail(request_id, error)

    def _fail(self, request_id: str, error: EngineError) -> None:
        self.core.finish(request_id, FinishReason.ERROR)
        self._publish_stats(0)
        stream = self._streams.pop(request_id, None)
        if stream is not None:  # also when the failed step had finished it: its last event was never sent
            request = stream.request
            stream.deliver(GenerationEvent("", (), len(request.prompt_ids), len(request.output_ids), error=error))

    def _release_cached_memory(self) -> None:
        # The tutorial emptied the CUDA cache after every call; doing it only when idle keeps
        # that promise without slowing a batch.
        release_free_host_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()

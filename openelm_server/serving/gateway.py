"""The gateway from HTTP routes to the engine: tokens in, limits, timeouts, metrics, events out.

Routes call this and never touch tensors; the engine below never sees a request object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from openelm_server.config import Settings
from openelm_server.engine.async_engine import Engine, QueueFullError, RequestStream
from openelm_server.engine.logprobs import TokenLogprob
from openelm_server.engine.output import EngineError, GenerationEvent, IncrementalDetokenizer
from openelm_server.engine.sampling import SamplingParams
from openelm_server.serving.errors import ApiError
from openelm_server.serving.metrics import Metrics

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.2
# SentencePiece's byte-fallback pieces, one byte each, for characters outside the vocabulary.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Generation:
    """The whole result of one request, as the non-streaming routes answer it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # With logprobs: one entry per generated token, and where its text starts in ``text``.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def api_error_from_engine(error: EngineError) -> ApiError:
    """A failed generation as the client sees it: retryable ones (out of memory, shutting down) are 503s."""
    if error.retryable:
        return ApiError(503, str(error), code="overloaded", headers={"Retry-After": "1"})
    return ApiError(500, str(error), code="internal_error")


class EventStream:
    """One request's events as a route reads them, under ``--request-timeout``; an engine error
    comes out as the :class:`ApiError` the client gets.

    Invariant: once the route is done with it, the request ends. Closing (``aclose``) cancels the
    request whether or not anything was read yet, and so does a cancellation or error while
    reading: a response abandoned before its body started must not leave its generation running.
    Its metrics are observed, and its speculative decoding logged, once, when it closes.
    """

    def __init__(self, stream: RequestStream, metrics: Metrics, timeout: float):
        self._stream = stream
        self._metrics = metrics
        self._start = time.monotonic()
        self._deadline = self._start + timeout
        self._timeout = timeout
        self._first_token: float | None = None
        self._last: GenerationEvent | None = None
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._closed or self._stream.finished:
            self.close()
            raise StopAsyncIteration
        try:
            event = await asyncio.wait_for(anext(self._stream), timeout=self._deadline - time.monotonic())
        except TimeoutError:
            self.close()
            raise ApiError(
                503,
                f"the request took longer than {self._timeout:g} s (--request-timeout) and was cancelled",
                code="timeout",
            ) from None
        except BaseException:  # cancelled: nobody will read the rest
            self.close()
            raise
        self._last = event
        if event.error is not None:
            self.close()
            raise api_error_from_engine(event.error)
        if self._first_token is None and event.token_ids:
            self._first_token = time.monotonic()
        return event

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.cancel()
        if self._last is not None:
            event = self._last
            self._metrics.observe_generation(
                event.prompt_tokens, event.completion_tokens, self._start, self._first_token, time.monotonic()
            )
            if event.draft_tokens:
                log.info(
                    "speculative decoding: %d of %d proposed tokens accepted (%.0f%%)",
                    event.accepted_tokens,
                    event.draft_tokens,
                    100 * event.accepted_tokens / event.draft_tokens,
                )

    async def aclose(self) -> None:
        self.close()


class EngineStreamingResponse(StreamingResponse):
    """A streamed answer that ends its requests when the response ends, however it ends: also
    when the client leaves before the body's first chunk, when the body iterator never runs
    far enough to close them itself."""

    def __init__(self, content: AsyncIterator[str], streams: list[EventStream], **kwargs):
        super().__init__(content, **kwargs)
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.close()


class Gateway:
    """What the routes share: encoding and limits, starting requests on the engine, collecting or
    streaming their events under the timeout, and their metrics."""

    def __init__(self, engine: Engine, tokenizer, settings: Settings, metrics: Metrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.max_model_len = engine.config.max_model_len
        self.max_prompt_tokens = min(settings.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)
        # Ids the model embeds and the tokenizer can decode.
        self.vocab_size = min(engine.model.config.vocab_size, len(tokenizer))
        # Logprobs name the same tokens again and again; one cache per gateway, freed with it.
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids with BOS; a 400 when the prompt is empty or longer than the limit."""
        # Checked on characters first: a multi-megabyte prompt is refused before tokenizing it.
        if len(text) > self.max_prompt_tokens * 16:
            raise ApiError(
                400,
                f"{param} is {len(text)} characters, far beyond the limit of {self.max_prompt_tokens} tokens",
                param=param,
                code="context_length_exceeded",
            )
        ids = self.tokenizer(text).input_ids
        self._check_prompt_length(len(ids), param)
        return ids

    def _check_prompt_length(self, tokens: int, param: str) -> None:
        if tokens > self.max_prompt_tokens:
            raise ApiError(
                400,
                f"{param} is {tokens} tokens; the limit is {self.max_prompt_tokens} "
                f"(context {self.max_model_len} tokens)",
                param=param,
                code="context_length_exceeded",
            )

    def check_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        """A prompt given as token ids, taken as sent (no BOS added), checked against the
        vocabulary and the prompt limit."""
        self._check_prompt_length(len(token_ids), param)
        for index, token_id in enumerate(token_ids):
            if token_id >= self.vocab_size:
                raise ApiError(
                    400,
                    f"{param}.{index} is {token_id}, not a token id (the vocabulary has {self.vocab_size} tokens)",
                    param=f"{param}.{index}",
                )
        return token_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _token_text(self, token_id: int) -> tuple[str, bytes]:
        """A token as logprobs show it, and its UTF-8 bytes: SentencePiece's word-start mark
        becomes a space; a byte token that is not a whole character shows as ``bytes:\\xNN``
        (OpenAI's way), its ``bytes`` being that one byte."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:
            value = int(byte.group(1), 16)
            return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), bytes([value])
        text = piece.replace("\u2581", " ")
        return text, text.encode("utf-8")

    def text_offsets(self, token_ids: list[int]) -> list[int]:
        """Where each token's text starts in the text the tokens decode to."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, [])
        offsets, length = [], 0
        for token_id in token_ids:
            offsets.append(length)
            length += len(detokenizer.push(token_id))
        return offsets

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias (token ids as strings) as (id, bias) pairs."""
        pairs: dict[int, float] = {}
        for key, value in (bias or {}).items():
            if not key.isascii() or not key.isdigit() or int(key) >= self.vocab_size:
                raise ApiError(
                    400,
                    f"logit_bias: {key!r} is not a token id (0 to {self.vocab_size - 1})",
                    param=f"logit_bias.{key}",
                )
            pairs[int(key)] = pairs.get(int(key), 0.0) + value
        return tuple(pairs.items())

    def max_new_tokens(self, prompt_tokens: int, requested: int | None, param: str, default: int | None = None) -> int:
        """What a request may generate: its ask checked against the limits, or else the
        default, or else all the room left."""
        room = self.max_model_len - prompt_tokens
        if requested is None:
            return min(room, self.settings.max_tokens_limit, default or room)
        if requested > self.settings.max_tokens_limit:
            raise ApiError(
                400, f"{param} is {requested}; this server allows at most {self.settings.max_tokens_limit}", param=param
            )
        if requested > room:
            raise ApiError(
                400,
                f"{param} is {requested}, but the prompt is {prompt_tokens} tokens and the context is "
                f"{self.max_model_len}: at most {room} tokens can be generated",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def start(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[EventStream]:
        """Queue requests and return their event streams; leaving a stream early cancels its
        request. A full queue or a request that cannot fit raises here, before any answer is
        sent, and cancels the requests of ``jobs`` already queued."""
        started: list[RequestStream] = []
        try:
            for prompt_ids, params in jobs:
                started.append(self.engine.generate(prompt_ids, params))
        except QueueFullError as error:
            self._cancel(started)
            raise ApiError(
                503, f"the server is busy: {error}; retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from error
        except ValueError as error:
            self._cancel(started)
            raise ApiError(400, str(error)) from error
        return [EventStream(stream, self.metrics, self.settings.request_timeout) for stream in started]

    @staticmethod
    def _cancel(streams: list[RequestStream]) -> None:
        for stream in streams:
            stream.cancel()

    async def collect(self, request: Request, events: EventStream) -> Generation:
        """Run a started request to the end; a client that disconnects meanwhile cancels it."""
        result = Generation()

        async def consume() -> Generation:
            async for event in events:
                result.text_offsets.extend(len(result.text) for _ in event.logprobs)
                result.logprobs.extend(event.logprobs)
                if event.prompt_logprobs is not None:
                    result.prompt_logprobs = event.prompt_logprobs
                result.text += event.text
                result.token_ids.extend(event.token_ids)
                result.finish_reason = event.finish_reason
                result.prompt_tokens = event.prompt_tokens
                result.completion_tokens = event.completion_tokens
            return result

        consumer = asyncio.ensure_future(consume())
        try:
            while not consumer.done():
                await asyncio.wait([consumer], timeout=DISCONNECT_POLL_SECONDS)
                if not consumer.done() and await request.is_disconnected():
                    log.info("client disconnected; generation cancelled")
                    raise ApiError(499, "client disconnected")
            return consumer.result()
        finally:
            # Before Python 3.12, asyncio.wait_for drops a cancel that lands just as its result
            # arrives, and the consumer would read on to the last token: cancel until it stops.
            while not consumer.done():
                consumer.cancel()
                await asyncio.wait([consumer], timeout=DISCONNECT_POLL_SECONDS)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                consumer.result()
            await events.aclose()

"""The legacy API, the tutorial's contract kept forever: ``POST /`` with ``{"prompt": ...}`` answers
``{"response", "status", "time"}`` (the prompt followed by its continuation) and logs one line.

Generation follows transformers' ``generate`` as the tutorial called it: greedy unless ``do_sample``,
``max_length`` (prompt included, 384 by default) unless ``max_new_tokens`` is given.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from openelm_server.config import Settings
from openelm_server.engine.sampling import SamplingParams
from openelm_server.serving.errors import ApiError, now_text
from openelm_server.serving.gateway import EngineStreamingResponse, Gateway
from openelm_server.serving.protocol import LegacyError, LegacyRequest, LegacyResponse

log = logging.getLogger(__name__)
legacy_log = logging.getLogger("openelm_server.legacy")

LEGACY_MAX_LENGTH = 384
# transformers' generate samples from the 50 best tokens unless told otherwise; the
# tutorial's users get the same when they turn do_sample on.
LEGACY_TOP_K = 50
SHORT_LOG_CHARS = 60

router = APIRouter()


@router.post(
    "/",
    response_model=LegacyResponse,
    responses={400: {"model": LegacyError}, 413: {"model": LegacyError}, 503: {"model": LegacyError}},
)
async def legacy_generate(body: LegacyRequest, request: Request):
    gateway: Gateway = request.app.state.gateway
    settings: Settings = request.app.state.settings
    prompt_ids = gateway.encode(body.prompt)
    params = _params(body, prompt_ids, gateway)
    prompt_text = gateway.decode(prompt_ids)
    [events] = gateway.start([(prompt_ids, params)])
    if body.stream:
        return EngineStreamingResponse(
            _stream(prompt_text, events, body.prompt, settings), [events], media_type="text/plain; charset=utf-8"
        )
    result = await gateway.collect(request, events)
    response = prompt_text + result.text
    time_text = now_text()
    _log_line(time_text, body.prompt, response, settings)
    return LegacyResponse(response=response, status=200, time=time_text)


def _params(body: LegacyRequest, prompt_ids: list[int], gateway: Gateway) -> SamplingParams:
    """transformers' generate semantics: max_new_tokens wins over max_length (prompt included)."""
    if body.max_new_tokens is not None:
        max_new = gateway.max_new_tokens(len(prompt_ids), body.max_new_tokens, "max_new_tokens")
    else:
        max_length = body.max_length or LEGACY_MAX_LENGTH
        if max_length > gateway.max_model_len:
            raise ApiError(
                400, f"max_length is {max_length}; the context is {gateway.max_model_len} tokens", param="max_length"
            )
        if max_length <= len(prompt_ids):
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens, which leaves no room under max_length "
                f"{max_length} (prompt included); raise max_length or set max_new_tokens",
                param="max_length",
            )
        max_new = gateway.max_new_tokens(len(prompt_ids), max_length - len(prompt_ids), "max_length")
    sampled = body.do_sample and body.temperature != 0
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=(1.0 if body.temperature is None else body.temperature) if sampled else 0.0,
        top_p=body.top_p or 1.0,
        top_k=(LEGACY_TOP_K if body.top_k is None else body.top_k) if sampled else 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=body.stop_strings,
    )


async def _stream(prompt_text: str, events: AsyncIterator, prompt: str, settings: Settings) -> AsyncIterator[str]:
    """Plain text: the prompt first, then the continuation as it is made, so that the pieces
    joined equal the non-streamed ``response``."""
    pieces = [prompt_text]
    try:
        yield prompt_text
        async for event in events:
            if event.text:
                pieces.append(event.text)
                yield event.text
    except ApiError as error:
        log.warning("stream ended early: %s", error.message)
    finally:
        await events.aclose()
        _log_line(now_text(), prompt, "".join(pieces), settings)


def _shorten(text: str, settings: Settings) -> str:
    if settings.log_prompts or len(text) <= SHORT_LOG_CHARS:
        return text
    return f"{text[:SHORT_LOG_CHARS]}…({len(text)} chars)"


def _log_line(time_text: str, prompt: str, response: str, settings: Settings) -> None:
    # The original tutorial's line, kept as it was (odd quotes included): people grep for it.
    legacy_log.info(
        '[%s] ", prompt:"%s", response:"%s"', time_text, _shorten(prompt, settings), repr(_shorten(response, settings))
    )

"""What /v1/completions and /v1/chat/completions share: refusing fields this server does not
handle, each choice's sampling parameters (response_format as an output constraint), collecting
or streaming the choices' generations, SSE events, and usage.

Every choice of an answer is an engine request of its own (a ChoiceJob); all of an answer's
streams are closed when the answer ends, read or not, so that no generation runs on for a client
that has gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.structured import ANY_OBJECT_SCHEMA, OutputConstraint
from openelm_server.serving.errors import ApiError
from openelm_server.serving.gateway import EngineStreamingResponse, EventStream, Gateway, Generation
from openelm_server.serving.protocol import OpenAIRequest, Usage, unsupported_fields

SEED_SPACE = 2**64


@dataclass
class ChoiceJob:
    """One choice of an answer: the prompt it continues, how, and what it echoes (None: no echo)."""

    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def refuse_unsupported(body: OpenAIRequest, handled: tuple[str, ...] = ()) -> None:
    for name in unsupported_fields(body, handled):
        raise ApiError(400, f"{name} is not supported by this server; leave it out (or null)", param=name)


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i, so that every choice differs and the
    whole answer is reproducible; wrapped to stay a valid 64-bit seed."""
    if seed is None:
        return None
    shifted = seed + choice
    return shifted - SEED_SPACE if shifted >= SEED_SPACE else shifted


def output_constraint(body: OpenAIRequest) -> OutputConstraint | None:
    """response_format as an output constraint: json_object (any JSON object) or json_schema."""
    response_format = body.response_format
    if response_format is None or response_format == {"type": "text"}:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return OutputConstraint(ANY_OBJECT_SCHEMA)
    if kind != "json_schema":
        raise ApiError(
            400,
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}; '
            f"type {kind!r} is not supported",
            param="response_format.type",
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    constraint = OutputConstraint(json.dumps(schema))
    problem = constraint.problem()
    if problem:
        raise ApiError(
            400,
            f"response_format.json_schema.schema is not supported: {problem}",
            param="response_format.json_schema.schema",
        )
    return constraint


def sampling_params(
    body: OpenAIRequest,
    gateway: Gateway,
    max_new_tokens: int,
    choice: int,
    constraint: OutputConstraint | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    min_tokens = body.min_tokens or 0
    if min_tokens > max_new_tokens:
        raise ApiError(
            400,
            f"min_tokens is {min_tokens}, more than the {max_new_tokens} tokens this answer may have",
            param="min_tokens",
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=_choice_seed(body.seed, choice),
        stop=body.stop_strings,
        ignore_eos=bool(body.ignore_eos),
        min_tokens=min_tokens,
        logit_bias=gateway.logit_bias(body.logit_bias),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
    )


def sse_event(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """Prompt tokens count once per prompt, however many choices continue it (as OpenAI counts)."""
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def usage_event(
    completion_id: str, chunk_object: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> str:
    """A stream's last chunk before [DONE] when the client asked for usage: no choices, the counts."""
    return sse_event(
        {
            "id": completion_id,
            "object": chunk_object,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens).model_dump(),
        }
    )


def usage_requested(body: OpenAIRequest) -> bool:
    """stream_options.include_usage: a last chunk with the usage, as OpenAI sends it."""
    return bool(body.stream_options and body.stream_options.include_usage)


async def collect_all(gateway: Gateway, request: Request, streams: list[EventStream]) -> list[Generation]:
    tasks = [asyncio.ensure_future(gateway.collect(request, events)) for events in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # one failed: the others stop too
        for events in streams:
            events.close()  # also those whose task was cancelled before it began


def sse_response(chunks: AsyncIterator[str], streams: list[EventStream]) -> EngineStreamingResponse:
    return EngineStreamingResponse(
        chunks,
        streams,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def merge_streams(streams: list[EventStream]) -> AsyncIterator[tuple[int, object]]:
    """Events of several requests as they come, tagged with the request's index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except ApiError as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()

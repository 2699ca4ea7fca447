"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, with SSE."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .chat import ChatTemplateError
from .generation import Generation, GenerationService
from .http_errors import ApiError, error_body
from .sampling import SamplingParams
from .schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
                      CompletionChoice, CompletionRequest, ErrorResponse, ModelCard, ModelList, OpenAIRequest, Usage)

router = APIRouter(prefix="/v1", responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                                              404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                              503: {"model": ErrorResponse}})
STARTED = int(time.time())
# OpenAI's default for /v1/completions; chat answers may use all the room left.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _check_model(request: Request, body: OpenAIRequest) -> str:
    """The served name; the request may also use one of its aliases (the published names)."""
    settings = request.app.state.settings
    name = settings.model_name
    if body.model is not None and body.model != name and body.model not in settings.model_aliases:
        accepted = ", ".join(repr(n) for n in (name, *settings.model_aliases))
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {name!r} "
                            f"(accepted names: {accepted})", param="model", code="model_not_found")
    return name


def _params(body: OpenAIRequest, max_new_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=stop,
    )


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(results: list[Generation]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    service = _service(request)
    return ModelList(data=[ModelCard(id=request.app.state.settings.model_name, created=STARTED,
                                     max_model_len=service.max_model_len)])


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request):
    model = _check_model(request, body)
    service = _service(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    jobs = []
    for index, prompt in enumerate(prompts):
        param = "prompt" if isinstance(body.prompt, str) else f"prompt.{index}"
        prompt_ids = service.encode(prompt, param)
        params = _params(body, service.max_new_tokens(len(prompt_ids), body.max_tokens, "max_tokens",
                                                      default=COMPLETIONS_DEFAULT_MAX_TOKENS))
        # OpenAI echoes the prompt as sent: decoding its tokens would drop a leading space.
        echo = prompt if body.echo else ""
        jobs.append((prompt_ids, params, echo))
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = service.start([(ids, params) for ids, params, _ in jobs])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(_completion_chunks(completion_id, created, model, jobs, streams, include_usage))
    tasks = [asyncio.ensure_future(service.collect(request, events)) for events in streams]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # one failed: the others stop too
    choices = [CompletionChoice(index=i, text=echo + r.text, finish_reason=r.finish_reason)
               for i, ((_, _, echo), r) in enumerate(zip(jobs, results))]
    return Completion(id=completion_id, created=created, model=model, choices=choices, usage=_usage(list(results)))


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model = _check_model(request, body)
    service = _service(request)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = request.app.state.chat_template.render(messages)
    except ChatTemplateError as error:
        raise ApiError(400, str(error), param="messages") from error
    prompt_ids = service.encode(prompt, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = _params(body, service.max_new_tokens(len(prompt_ids), requested, param))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    [events] = service.start([(prompt_ids, params)])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(_chat_chunks(completion_id, created, model, len(prompt_ids), events, include_usage))
    result = await service.collect(request, events)
    choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
    return ChatCompletion(id=completion_id, created=created, model=model, choices=[choice], usage=_usage([result]))


def _sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
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
            await stream.aclose()


async def _completion_chunks(completion_id: str, created: int, model: str, jobs: list, streams: list,
                             include_usage: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None) -> str:
        return _sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]})

    results = [Generation(prompt_tokens=len(ids)) for ids, _, _ in jobs]
    for index, (_, _, echo) in enumerate(jobs):
        if echo:
            yield chunk(index, echo, None)
    async for index, event in _merge(streams):
        if isinstance(event, ApiError):
            yield _sse(error_body("/v1", event))
            return
        results[index].completion_tokens = event.completion_tokens
        if event.text or event.finish_reason:
            yield chunk(index, event.text, event.finish_reason)
    if include_usage:
        yield _sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": _usage(results).model_dump()})
    yield _sse("[DONE]")


async def _chat_chunks(completion_id: str, created: int, model: str, prompt_tokens: int, events: AsyncIterator,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    result = Generation(prompt_tokens=prompt_tokens)
    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for event in events:
            result.completion_tokens = event.completion_tokens
            if event.text:
                yield chunk({"content": event.text}, None)
            if event.finish_reason:
                yield chunk({}, event.finish_reason)
    except ApiError as error:
        yield _sse(error_body("/v1", error))
        return
    finally:
        await events.aclose()
    if include_usage:
        yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage([result]).model_dump()})
    yield _sse("[DONE]")

"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, with SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request

from openelm_server.engine.sampling import SamplingParams
from openelm_server.engine.structured import ANY_OBJECT_SCHEMA, OutputConstraint
from openelm_server.serving.chat_template import ChatTemplateError
from openelm_server.serving.errors import ApiError, error_body
from openelm_server.serving.gateway import EngineStreamingResponse, EventStream, Gateway, Generation
from openelm_server.serving.openai_logprobs import (
    chat_logprobs,
    generated_logprobs,
    join_completion_logprobs,
    prompt_logprobs,
)
from openelm_server.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIRequest,
    Usage,
    unsupported_fields,
)
from openelm_server.serving.tool_calls import ToolCallPlan, plan_tool_call, tool_calls

router = APIRouter(
    prefix="/v1",
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
STARTED = int(time.time())
# OpenAI's default for /v1/completions; chat answers may use all the room left.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
SEED_SPACE = 2**64


@dataclass
class ChoiceJob:
    """One choice of an answer: the prompt it continues, how, and what it echoes (None: no echo)."""

    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _model_not_found(asked: str, settings) -> ApiError:
    accepted = ", ".join(repr(n) for n in (settings.model_name, *settings.model_aliases))
    return ApiError(
        404,
        f"the model {asked!r} does not exist; this server serves {settings.model_name!r} (accepted names: {accepted})",
        param="model",
        code="model_not_found",
    )


def _check_model(request: Request, body: OpenAIRequest) -> str:
    """The served name; the request may also use one of its aliases (the published names)."""
    settings = request.app.state.settings
    name = settings.model_name
    if body.model is not None and body.model != name and body.model not in settings.model_aliases:
        raise _model_not_found(body.model, settings)
    return name


def _refuse_unsupported(body: OpenAIRequest, handled: tuple[str, ...] = ()) -> None:
    for name in unsupported_fields(body, handled):
        raise ApiError(400, f"{name} is not supported by this server; leave it out (or null)", param=name)


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i, so that every choice differs and the
    whole answer is reproducible; wrapped to stay a valid 64-bit seed."""
    if seed is None:
        return None
    shifted = seed + choice
    return shifted - SEED_SPACE if shifted >= SEED_SPACE else shifted


def _constraint(body: OpenAIRequest) -> OutputConstraint | None:
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


def _params(
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


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """Prompt tokens count once per prompt, however many choices continue it (as OpenAI counts)."""
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _include_usage(body: OpenAIRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    settings = request.app.state.settings
    if model_id != settings.model_name and model_id not in settings.model_aliases:
        raise _model_not_found(model_id, settings)
    return _model_card(request)


def _model_card(request: Request) -> ModelCard:
    return ModelCard(
        id=request.app.state.settings.model_name, created=STARTED, max_model_len=_gateway(request).max_model_len
    )


def _completion_prompts(body: CompletionRequest, gateway: Gateway) -> list[tuple[list[int], str | None]]:
    """(token ids, text as sent) of each prompt. Text is tokenized with BOS first; token ids are
    taken as sent (text None), as vLLM and lm-eval expect."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [(gateway.encode(prompt, "prompt"), prompt)]
    if isinstance(prompt[0], int):
        return [(gateway.check_token_ids(prompt, "prompt"), None)]
    prompts = []
    for index, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append((gateway.encode(item, f"prompt.{index}"), item))
        else:
            prompts.append((gateway.check_token_ids(item, f"prompt.{index}"), None))
    return prompts


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request):
    model = _check_model(request, body)
    _refuse_unsupported(body)
    gateway = _gateway(request)
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise ApiError(400, f"best_of {body.best_of} is not supported; only best_of equal to n ({n})", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens 0 is only allowed with echo (the prompt's logprobs, nothing generated)", param="max_tokens"
        )
    prompts = _completion_prompts(body, gateway)
    constraint = _constraint(body)
    jobs = []
    for prompt_ids, text in prompts:
        max_new = gateway.max_new_tokens(
            len(prompt_ids), body.max_tokens, "max_tokens", default=COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        # OpenAI echoes the prompt as sent: decoding its tokens would drop a leading space.
        echo = (text if text is not None else gateway.decode(prompt_ids)) if body.echo else None
        for choice in range(n):
            params = _params(
                body,
                gateway,
                max_new,
                choice,
                constraint,
                logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if body.echo else None,
            )
            jobs.append(ChoiceJob(prompt_ids, params, echo))
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = gateway.start([(job.prompt_ids, job.params) for job in jobs])
    if body.stream:
        return _sse_response(
            _completion_chunks(
                gateway,
                completion_id,
                created,
                model,
                jobs,
                streams,
                body.logprobs,
                prompt_tokens,
                _include_usage(body),
            ),
            streams,
        )
    results = await _collect_all(gateway, request, streams)
    choices = [
        CompletionChoice(
            index=index,
            text=(job.echo or "") + result.text,
            logprobs=_completion_choice_logprobs(gateway, job, result, body.logprobs),
            finish_reason=result.finish_reason,
        )
        for index, (job, result) in enumerate(zip(jobs, results))
    ]
    return Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=choices,
        usage=_usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    )


def _completion_choice_logprobs(
    gateway: Gateway, job: ChoiceJob, result: Generation, logprobs: int | None
) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    scored = generated_logprobs(gateway, result.logprobs, result.text_offsets, len(job.echo or ""))
    if job.echo is not None:
        scored = join_completion_logprobs(
            prompt_logprobs(gateway, job.prompt_ids, result.prompt_logprobs, job.echo), scored
        )
    return CompletionLogprobs(**scored)


async def _collect_all(gateway: Gateway, request: Request, streams: list[EventStream]) -> list[Generation]:
    tasks = [asyncio.ensure_future(gateway.collect(request, events)) for events in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # one failed: the others stop too
        for events in streams:
            events.close()  # also those whose task was cancelled before it began


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model = _check_model(request, body)
    _refuse_unsupported(body, handled=("tools", "tool_choice"))
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    gateway = _gateway(request)
    plan = plan_tool_call(body.tools, body.tool_choice)
    constraint = _constraint(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if plan is not None:
        if constraint is not None:
            raise ApiError(400, "response_format together with a tool call is not supported", param="response_format")
        if body.stream:
            raise ApiError(400, "streaming a tool call is not supported; send stream false", param="stream")
        constraint = plan.constraint
        messages = _with_instructions(messages, plan.instructions)
    try:
        prompt = request.app.state.chat_template.render(messages)
    except ChatTemplateError as error:
        raise ApiError(400, str(error), param="messages") from error
    prompt_ids = gateway.encode(prompt, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = gateway.max_new_tokens(len(prompt_ids), requested, param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [
        ChoiceJob(prompt_ids, _params(body, gateway, max_new, choice, constraint, logprobs=logprobs))
        for choice in range(body.n or 1)
    ]
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = gateway.start([(job.prompt_ids, job.params) for job in jobs])
    if body.stream:
        return _sse_response(
            _chat_chunks(
                gateway,
                completion_id,
                created,
                model,
                streams,
                logprobs is not None,
                len(prompt_ids),
                _include_usage(body),
            ),
            streams,
        )
    results = await _collect_all(gateway, request, streams)
    choices = [
        ChatChoice(
            index=index,
            message=_assistant_message(plan, result),
            logprobs=ChatLogprobs(content=chat_logprobs(gateway, result.logprobs)) if logprobs is not None else None,
            finish_reason=_chat_finish_reason(plan, result),
        )
        for index, result in enumerate(results)
    ]
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=choices,
        usage=_usage(len(prompt_ids), sum(r.completion_tokens for r in results)),
    )


def _with_instructions(messages: list[dict], instructions: str) -> list[dict]:
    """The tool-call instructions in the system message (added first if there is none)."""
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{instructions}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def _assistant_message(plan: ToolCallPlan | None, result: Generation) -> AssistantMessage:
    calls = tool_calls(plan, result.text) if plan is not None else None
    if calls is None:
        return AssistantMessage(content=result.text)
    return AssistantMessage(content=None, tool_calls=calls)


def _chat_finish_reason(plan: ToolCallPlan | None, result: Generation) -> str | None:
    """As OpenAI: "tool_calls" when the model called a function of its choice ("required"); a
    call to the function tool_choice names ends with "stop"."""
    if plan is not None and plan.function is None and result.finish_reason == "stop":
        return "tool_calls"
    return result.finish_reason


def _sse_response(chunks: AsyncIterator[str], streams: list[EventStream]) -> EngineStreamingResponse:
    return EngineStreamingResponse(
        chunks,
        streams,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


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
            # A pump still inside its stream (its cancel not yet delivered) cannot close it
            # from here; the cancel closes it as it unwinds the stream.
            with contextlib.suppress(RuntimeError):
                await stream.aclose()


async def _completion_chunks(
    gateway: Gateway,
    completion_id: str,
    created: int,
    model: str,
    jobs: list[ChoiceJob],
    streams: list,
    logprobs: int | None,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Choices interleaved as their tokens come; each choice's echo comes first: at once (a
    client sees the stream open even while its request waits for a slot), or with logprobs
    once its prompt is prefilled and scored."""

    def chunk(index: int, text: str, finish_reason: str | None, scored: dict | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": index, "text": text, "logprobs": scored, "finish_reason": finish_reason}],
            }
        )

    completion_tokens = [0] * len(jobs)
    sent_characters = [len(job.echo or "") for job in jobs]  # where the next text starts (text_offset)
    echoed = [False] * len(jobs)
    if logprobs is None:
        for index, job in enumerate(jobs):
            if job.echo is not None:
                echoed[index] = True
                yield chunk(index, job.echo, None)
    async for index, event in _merge(streams):
        if isinstance(event, ApiError):
            yield _sse(error_body("/v1", event))
            return
        job = jobs[index]
        if job.echo is not None and not echoed[index]:
            echoed[index] = True
            scored = (
                None if logprobs is None else prompt_logprobs(gateway, job.prompt_ids, event.prompt_logprobs, job.echo)
            )
            yield chunk(index, job.echo, None, scored)
        completion_tokens[index] = event.completion_tokens
        scored = None
        if logprobs is not None and event.logprobs:
            scored = generated_logprobs(
                gateway, list(event.logprobs), [0] * len(event.logprobs), sent_characters[index]
            )
        sent_characters[index] += len(event.text)
        if event.text or event.finish_reason or scored:
            yield chunk(index, event.text, event.finish_reason, scored)
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(prompt_tokens, sum(completion_tokens)).model_dump(),
            }
        )
    yield _sse("[DONE]")


async def _chat_chunks(
    gateway: Gateway,
    completion_id: str,
    created: int,
    model: str,
    streams: list,
    logprobs: bool,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict, finish_reason: str | None, scored: list | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": None if scored is None else {"content": scored},
                        "finish_reason": finish_reason,
                    }
                ],
            }
        )

    completion_tokens = [0] * len(streams)
    for index in range(len(streams)):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    async for index, event in _merge(streams):
        if isinstance(event, ApiError):
            yield _sse(error_body("/v1", event))
            return
        completion_tokens[index] = event.completion_tokens
        scored = chat_logprobs(gateway, list(event.logprobs)) if logprobs and event.logprobs else None
        if event.text or scored:
            yield chunk(index, {"content": event.text}, None, scored)
        if event.finish_reason:
            yield chunk(index, {}, event.finish_reason)
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(prompt_tokens, sum(completion_tokens)).model_dump(),
            }
        )
    yield _sse("[DONE]")

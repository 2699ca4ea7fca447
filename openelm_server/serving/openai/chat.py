"""POST /v1/chat/completions: messages through the chat template, n choices, logprobs in the
``content[]`` shape, tool calls (not streamed), streamed as SSE or answered whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from openelm_server.serving.chat_template import ChatTemplateError
from openelm_server.serving.errors import ApiError, error_body
from openelm_server.serving.gateway import Gateway, Generation
from openelm_server.serving.openai.generation import (
    ChoiceJob,
    collect_all,
    gateway_of,
    merge_streams,
    output_constraint,
    refuse_unsupported,
    sampling_params,
    sse_event,
    sse_response,
    usage,
    usage_event,
    usage_requested,
)
from openelm_server.serving.openai.logprobs import chat_logprobs
from openelm_server.serving.openai.models import check_model
from openelm_server.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
)
from openelm_server.serving.tool_calls import ToolCallPlan, plan_tool_call, tool_calls

router = APIRouter(prefix="/v1")


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    model = check_model(request, body)
    refuse_unsupported(body, handled=("tools", "tool_choice"))
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    gateway = gateway_of(request)
    plan = plan_tool_call(body.tools, body.tool_choice)
    constraint = output_constraint(body)
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
        ChoiceJob(prompt_ids, sampling_params(body, gateway, max_new, choice, constraint, logprobs=logprobs))
        for choice in range(body.n or 1)
    ]
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = gateway.start([(job.prompt_ids, job.params) for job in jobs])
    if body.stream:
        return sse_response(
            _chat_chunks(
                gateway,
                completion_id,
                created,
                model,
                streams,
                logprobs is not None,
                len(prompt_ids),
                usage_requested(body),
            ),
            streams,
        )
    results = await collect_all(gateway, request, streams)
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
        usage=usage(len(prompt_ids), sum(r.completion_tokens for r in results)),
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
        return sse_event(
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
    async for index, event in merge_streams(streams):
        if isinstance(event, ApiError):
            yield sse_event(error_body("/v1", event))
            return
        completion_tokens[index] = event.completion_tokens
        scored = chat_logprobs(gateway, list(event.logprobs)) if logprobs and event.logprobs else None
        if event.text or scored:
            yield chunk(index, {"content": event.text}, None, scored)
        if event.finish_reason:
            yield chunk(index, {}, event.finish_reason)
    if include_usage:
        yield usage_event(completion_id, "chat.completion.chunk", created, model, prompt_tokens, sum(completion_tokens))
    yield sse_event("[DONE]")

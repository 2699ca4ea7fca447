"""POST /v1/completions: text or token-id prompts (one or several), n choices each, echo and
logprobs in the legacy shape, streamed as SSE or answered whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

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
from openelm_server.serving.openai.logprobs import generated_logprobs, join_completion_logprobs, prompt_logprobs
from openelm_server.serving.openai.models import check_model
from openelm_server.serving.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest

router = APIRouter(prefix="/v1")
# OpenAI's default for /v1/completions; chat answers may use all the room left.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


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
    model = check_model(request, body)
    refuse_unsupported(body)
    gateway = gateway_of(request)
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise ApiError(400, f"best_of {body.best_of} is not supported; only best_of equal to n ({n})", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens 0 is only allowed with echo (the prompt's logprobs, nothing generated)", param="max_tokens"
        )
    prompts = _completion_prompts(body, gateway)
    constraint = output_constraint(body)
    jobs = []
    for prompt_ids, text in prompts:
        max_new = gateway.max_new_tokens(
            len(prompt_ids), body.max_tokens, "max_tokens", default=COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        # OpenAI echoes the prompt as sent: decoding its tokens would drop a leading space.
        echo = (text if text is not None else gateway.decode(prompt_ids)) if body.echo else None
        for choice in range(n):
            params = sampling_params(
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
        return sse_response(
            _completion_chunks(
                gateway,
                completion_id,
                created,
                model,
                jobs,
                streams,
                body.logprobs,
                prompt_tokens,
                usage_requested(body),
            ),
            streams,
        )
    results = await collect_all(gateway, request, streams)
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
        usage=usage(prompt_tokens, sum(r.completion_tokens for r in results)),
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
        return sse_event(
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
    async for index, event in merge_streams(streams):
        if isinstance(event, ApiError):
            yield sse_event(error_body("/v1", event))
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
        yield usage_event(completion_id, "text_completion", created, model, prompt_tokens, sum(completion_tokens))
    yield sse_event("[DONE]")

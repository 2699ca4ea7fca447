"""vLLM's utility routes: /tokenize, /detokenize and /version, in vLLM's shapes.

Clients such as benchmark tools and evaluation harnesses use them to count and check tokens
with the server's own tokenizer and chat template.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from openelm_server.serving.chat_template import ChatTemplateError
from openelm_server.serving.errors import ApiError
from openelm_server.serving.gateway import Gateway
from openelm_server.serving.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

SERVER_VERSION = "1.0"

router = APIRouter(responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def _check_model(request: Request, model: str | None) -> None:
    name = request.app.state.settings.model_name
    if model is not None and model != name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {name!r}",
            param="model",
            code="model_not_found",
        )


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    _check_model(request, body.model)
    gateway: Gateway = request.app.state.gateway
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send either prompt or messages", param="prompt")
    if body.messages is not None:
        if body.add_generation_prompt is False:
            raise ApiError(
                400,
                "add_generation_prompt false is not supported: chat prompts always end with the assistant's turn",
                param="add_generation_prompt",
            )
        if body.add_special_tokens is not None:
            raise ApiError(
                400,
                "add_special_tokens is not supported with messages: the tokens are those "
                "/v1/chat/completions uses (BOS first)",
                param="add_special_tokens",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = request.app.state.chat_template.render(messages)
        except ChatTemplateError as error:
            raise ApiError(400, str(error), param="messages") from error
        tokens = gateway.tokenizer(text).input_ids
    else:
        if body.add_generation_prompt is not None:
            raise ApiError(400, "add_generation_prompt applies to messages only", param="add_generation_prompt")
        tokens = gateway.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False).input_ids
    token_strs = gateway.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(tokens), max_model_len=gateway.max_model_len, tokens=tokens, token_strs=token_strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _check_model(request, body.model)
    gateway: Gateway = request.app.state.gateway
    gateway.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=gateway.decode(body.tokens))


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=SERVER_VERSION)

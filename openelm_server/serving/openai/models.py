"""GET /v1/models and /v1/models/{id}, and the model names a request may use: the served name
and its aliases (the published names)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from openelm_server.serving.errors import ApiError
from openelm_server.serving.protocol import ModelCard, ModelList, OpenAIRequest

router = APIRouter(prefix="/v1")
STARTED = int(time.time())


def model_not_found(asked: str, settings) -> ApiError:
    accepted = ", ".join(repr(n) for n in (settings.model_name, *settings.model_aliases))
    return ApiError(
        404,
        f"the model {asked!r} does not exist; this server serves {settings.model_name!r} (accepted names: {accepted})",
        param="model",
        code="model_not_found",
    )


def check_model(request: Request, body: OpenAIRequest) -> str:
    """The served name; the request may also use one of its aliases (the published names)."""
    settings = request.app.state.settings
    name = settings.model_name
    if body.model is not None and body.model != name and body.model not in settings.model_aliases:
        raise model_not_found(body.model, settings)
    return name


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    settings = request.app.state.settings
    if model_id != settings.model_name and model_id not in settings.model_aliases:
        raise model_not_found(model_id, settings)
    return _model_card(request)


def _model_card(request: Request) -> ModelCard:
    return ModelCard(
        id=request.app.state.settings.model_name, created=STARTED, max_model_len=request.app.state.gateway.max_model_len
    )

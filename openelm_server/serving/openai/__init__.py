"""The OpenAI-compatible API under /v1: one module per endpoint (models, completions, chat), what
the two generation endpoints share in generation.py, logprobs in OpenAI's shapes in logprobs.py.

Each endpoint's router carries the /v1 prefix itself, not this one: the request metrics label a
request with the path of the route that answered it as that route was declared (middleware.py),
and a prefix added here would leave it out."""

from fastapi import APIRouter

from openelm_server.serving.openai import chat, completions, models
from openelm_server.serving.protocol import ErrorResponse

router = APIRouter(
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
router.include_router(models.router)
router.include_router(completions.router)
router.include_router(chat.router)

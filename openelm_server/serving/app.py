"""The HTTP application: the tutorial's ``POST /``, health, metrics, the OpenAI routes and the web page."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from openelm_server.config import Settings
from openelm_server.engine.async_engine import Engine
from openelm_server.engine.sampling import SamplingParams
from openelm_server.serving import openai, stats, tokenize_api, webui
from openelm_server.serving.chat_template import ChatTemplate
from openelm_server.serving.errors import ApiError, error_response, now_text
from openelm_server.serving.gateway import GenerationService
from openelm_server.serving.metrics import Metrics
from openelm_server.serving.middleware import GuardMiddleware
from openelm_server.serving.protocol import HealthResponse, TutorialError, TutorialRequest, TutorialResponse
from openelm_server.serving.replica_id import ReplicaIdMiddleware, new_replica_id

log = logging.getLogger(__name__)
tutorial_log = logging.getLogger("openelm_server.tutorial")

TUTORIAL_MAX_LENGTH = 384
# transformers' generate samples from the 50 best tokens unless told otherwise; the
# tutorial's users get the same when they turn do_sample on.
TUTORIAL_TOP_K = 50
SHORT_LOG_CHARS = 60


def create_app(settings: Settings, engine: Engine, tokenizer, replica_id: str | None = None) -> FastAPI:
    """``replica_id`` names this server in ``X-Replica-Id``; a new one (host, pid, random) if not given."""
    metrics = Metrics(engine.stats)
    service = GenerationService(engine, tokenizer, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(
        title="OpenELM server",
        version=tokenize_api.SERVER_VERSION,
        description="OpenELM-3B-Instruct: the tutorial's POST / and an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.chat_template = ChatTemplate.choose(settings.chat_template, tokenizer)
    _install_error_handlers(app)

    # HEAD too: load balancers and uptime probes often check with HEAD.
    @app.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(model=settings.model_name)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post(
        "/",
        response_model=TutorialResponse,
        responses={400: {"model": TutorialError}, 413: {"model": TutorialError}, 503: {"model": TutorialError}},
    )
    async def tutorial_generate(body: TutorialRequest, request: Request):
        prompt_ids = service.encode(body.prompt)
        params = _tutorial_params(body, prompt_ids, service)
        prompt_text = service.decode(prompt_ids)
        [events] = service.start([(prompt_ids, params)])
        if body.stream:
            return StreamingResponse(
                _tutorial_stream(prompt_text, events, body.prompt, settings), media_type="text/plain; charset=utf-8"
            )
        result = await service.collect(request, events)
        response = prompt_text + result.text
        time_text = now_text()
        _log_tutorial(time_text, body.prompt, response, settings)
        return TutorialResponse(response=response, status=200, time=time_text)

    app.include_router(openai.router)
    app.include_router(stats.router)
    app.include_router(webui.router(settings.webui))
    app.include_router(tokenize_api.router)
    app.add_middleware(
        GuardMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics
    )
    if settings.cors_origins:
        # Outside the guard, so that the guard's own answers (401, 413) carry CORS headers too and a
        # browser's preflight, which has no API key, is answered before the guard.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "X-Replica-Id"],
        )
    # Outermost of all, so that every answer (CORS preflights and the guard's 401/413 included) names its replica.
    app.state.replica_id = replica_id or new_replica_id()
    app.add_middleware(ReplicaIdMiddleware, replica_id=app.state.replica_id)
    log.info("replica id %s", app.state.replica_id)
    return app


def _tutorial_params(body: TutorialRequest, prompt_ids: list[int], service: GenerationService) -> SamplingParams:
    """transformers' generate semantics: max_new_tokens wins over max_length (prompt included)."""
    if body.max_new_tokens is not None:
        max_new = service.max_new_tokens(len(prompt_ids), body.max_new_tokens, "max_new_tokens")
    else:
        max_length = body.max_length or TUTORIAL_MAX_LENGTH
        if max_length > service.max_model_len:
            raise ApiError(
                400, f"max_length is {max_length}; the context is {service.max_model_len} tokens", param="max_length"
            )
        if max_length <= len(prompt_ids):
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens, which leaves no room under max_length "
                f"{max_length} (prompt included); raise max_length or set max_new_tokens",
                param="max_length",
            )
        max_new = service.max_new_tokens(len(prompt_ids), max_length - len(prompt_ids), "max_length")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampled = body.do_sample and body.temperature != 0
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=(1.0 if body.temperature is None else body.temperature) if sampled else 0.0,
        top_p=body.top_p or 1.0,
        top_k=(TUTORIAL_TOP_K if body.top_k is None else body.top_k) if sampled else 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=stop,
    )


async def _tutorial_stream(
    prompt_text: str, events: AsyncIterator, prompt: str, settings: Settings
) -> AsyncIterator[str]:
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
        _log_tutorial(now_text(), prompt, "".join(pieces), settings)


def _shorten(text: str, settings: Settings) -> str:
    if settings.log_prompts or len(text) <= SHORT_LOG_CHARS:
        return text
    return f"{text[:SHORT_LOG_CHARS]}…({len(text)} chars)"


def _log_tutorial(time_text: str, prompt: str, response: str, settings: Settings) -> None:
    # The original tutorial's line, kept as it was (odd quotes included): people grep for it.
    tutorial_log.info(
        '[%s] ", prompt:"%s", response:"%s"', time_text, _shorten(prompt, settings), repr(_shorten(response, settings))
    )


# pydantic names the member of a union that failed inside the location ("constrained-str",
# "list[constrained-str]"); users know only their field names and list indexes.
_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _user_location(location: tuple) -> tuple:
    return tuple(
        part
        for part in location
        if part != "body" and not (isinstance(part, str) and ("[" in part or "-" in part or part in _UNION_MEMBER_TAGS))
    )


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems = []
    field_errors: dict[tuple, list[str]] = {}
    for item in error.errors():
        location = _user_location(item.get("loc", ()))
        if item.get("type") == "missing" and not location:
            problems.append('the request body is empty; send a JSON object such as {"prompt": "..."}')
        elif item.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
        elif item.get("type") in ("model_attributes_type", "dict_type") and not location:
            problems.append("the body must be a JSON object")
        else:
            messages = field_errors.setdefault(location, [])
            if item.get("msg", "invalid") not in messages:
                messages.append(item.get("msg", "invalid"))
    # A union member that got deeper (prompt.1 of a list) says more than the one that failed at
    # the top (prompt is not a string): keep the deepest.
    locations = [
        loc for loc in field_errors if not any(other != loc and other[: len(loc)] == loc for other in field_errors)
    ]
    for location in locations:
        name = ".".join(str(part) for part in location) or "body"
        problems.append(f"{name}: {' or '.join(field_errors[location])}")
    param = None
    if locations and locations[0]:
        param = ".".join(str(part) for part in locations[0])
    return "; ".join(problems) or "invalid request", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return error_response(request.url.path, ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = error.detail if isinstance(error.detail, str) else "bad request"
        if error.status_code == 400 and message == "There was an error parsing the body":
            message = "the body could not be parsed as JSON (invalid UTF-8, or nested too deeply)"
        return error_response(request.url.path, ApiError(error.status_code, message, headers=dict(error.headers or {})))

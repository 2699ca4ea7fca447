"""The HTTP application: the routers (legacy ``POST /``, OpenAI, tokenize, stats, web page), health,
metrics, error handlers and middleware, around one engine."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from openelm_server.config import Settings
from openelm_server.engine.async_engine import Engine
from openelm_server.serving import legacy, openai, stats, tokenize_api, webui
from openelm_server.serving.chat_template import ChatTemplate
from openelm_server.serving.errors import install_error_handlers
from openelm_server.serving.gateway import Gateway
from openelm_server.serving.metrics import Metrics
from openelm_server.serving.middleware import ApiKeyMiddleware, BodyGuardMiddleware, RequestLogMiddleware
from openelm_server.serving.protocol import HealthResponse
from openelm_server.serving.replica_id import ReplicaIdMiddleware, new_replica_id

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine, tokenizer, replica_id: str | None = None) -> FastAPI:
    """``replica_id`` names this server in ``X-Replica-Id``; a new one (host, pid, random) if not given."""
    metrics = Metrics(engine.stats)
    gateway = Gateway(engine, tokenizer, settings, metrics)

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
        description="OpenELM-3B-Instruct: the legacy POST / and an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.settings = settings
    app.state.chat_template = ChatTemplate.choose(settings.chat_template, tokenizer)
    install_error_handlers(app)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(model=settings.model_name)

    # HEAD too: load balancers and uptime probes often check with HEAD. A route of its own, kept out
    # of the OpenAPI document, where it would repeat GET's operation id.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(legacy.router)
    app.include_router(openai.router)
    app.include_router(stats.router)
    app.include_router(webui.router(settings.webui))
    app.include_router(tokenize_api.router)
    # Added innermost first: the body guard, the API key, then the request log around both.
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    if settings.cors_origins:
        # Outside the others, so that their answers (401, 413) carry CORS headers too and a
        # browser's preflight, which has no API key, is answered before the key is asked for.
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

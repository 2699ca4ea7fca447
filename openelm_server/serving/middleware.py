"""What every request passes through before a route: request id, body limit, API key, metrics.

Written as plain ASGI so that streaming responses pass through untouched.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from openelm_server.serving.errors import ApiError, error_response
from openelm_server.serving.metrics import Metrics
from openelm_server.serving.webui import ASSET_PREFIX

access_log = logging.getLogger("openelm_server.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
KNOWN_ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/stats",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/version",
    "/docs",
    "/openapi.json",
}
OPEN_ROUTES = {"/health"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class BodyTooLarge(HTTPException):
    """Raised from the body reader; FastAPI passes HTTPExceptions through its body parsing."""


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given_id = headers.get("x-request-id", "")
        request_id = given_id if VALID_REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        path = scope["path"]
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            scope = _as_json(scope)
        route = path if path in KNOWN_ROUTES else "/webui" if path.startswith(ASSET_PREFIX) else "other"
        status = 500
        reason = ""
        start = time.monotonic()

        async def send_with_id(message):
            nonlocal status, reason
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and status >= 400 and not reason:
                reason = _error_reason(message.get("body", b""))
            await send(message)

        async def answer(error: ApiError):
            await error_response(path, error)(scope, receive, send_with_id)

        try:
            if self.api_key and _needs_key(scope["method"], path) and not self._authorized(headers):
                return await answer(
                    ApiError(
                        401, "missing or invalid API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
                    )
                )
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                # Read as JSON, a compressed body would fail with a misleading UTF-8 error.
                return await answer(
                    ApiError(
                        415,
                        f"Content-Encoding {encoding} is not supported; send the body uncompressed",
                        code="unsupported_content_encoding",
                    )
                )
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                return await answer(self._too_large())
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLarge(413, self._too_large().message)
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except BodyTooLarge:
                await answer(self._too_large())
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            access_log.info(
                '%s "%s %s" %d %.3fs%s',
                _client(scope),
                scope["method"],
                path,
                status,
                time.monotonic() - start,
                f" {reason}" if reason else "",
            )
            request_id_var.reset(token)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than {self.max_body_bytes} bytes (--max-body-bytes)")


def _needs_key(method: str, path: str) -> bool:
    if path in OPEN_ROUTES or method == "OPTIONS":
        return False
    # The web page (or, for other clients, the JSON description): a browser must load it before
    # the user can type the key into it. It holds no data; all it shows comes with the key.
    is_page = path == "/" or path.startswith(ASSET_PREFIX)
    return not (is_page and method in ("GET", "HEAD"))


def _as_json(scope):
    """Every POST body here is JSON. The tutorial's server read it as JSON whatever the
    Content-Type, so `curl -d '{...}'` (form-encoded by default) keeps working."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def _error_reason(body: bytes) -> str:
    """The message of an error body, in either route family's shape, for the access log: a
    400 without its reason leaves the operator guessing."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    return f"({message})" if isinstance(message, str) else ""


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"

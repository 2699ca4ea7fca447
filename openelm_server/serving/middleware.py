"""What every request passes through before a route, one job per middleware, outermost first:

- ``RequestLogMiddleware``: the request id (``X-Request-ID``, taken from the client when valid), the
  access log line with an error's reason, and the request counter labelled by route template;
- ``ApiKeyMiddleware``: ``Authorization: Bearer <key>`` on every route but /health and the web page;
- ``BodyGuardMiddleware``: POST bodies read as JSON, compressed bodies refused, the size limit.

Written as plain ASGI so that streaming responses pass through untouched. The answers of the inner
two go out through the outer one, so they are logged, counted and carry the request id too.
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
OPEN_ROUTES = {"/health"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestLogMiddleware:
    """Requests are counted by the template of the route that answered them (``/v1/models/{model_id}``);
    paths no route knows, and requests refused before routing (401, 413, 415), count as ``other``, so
    that scanners cannot grow the metrics without bound."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given_id = _header(scope, b"x-request-id")
        request_id = given_id if VALID_REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        reason = ""
        start = time.monotonic()

        async def send_with_id(message):
            nonlocal status, reason
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and status >= 400 and not reason:
                reason = _error_reason(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route=self._route(scope), status=str(status)).inc()
            access_log.info(
                '%s "%s %s" %d %.3fs%s',
                _client(scope),
                scope["method"],
                scope["path"],
                status,
                time.monotonic() - start,
                f" {reason}" if reason else "",
            )
            request_id_var.reset(token)

    @staticmethod
    def _route(scope) -> str:
        # The router puts the route it chose into the scope.
        return getattr(scope.get("route"), "path", "other")


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _needs_key(scope["method"], scope["path"]) or self._authorized(scope):
            return await self.app(scope, receive, send)
        error = ApiError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")
        await error_response(scope["path"], error)(scope, receive, send)

    def _authorized(self, scope) -> bool:
        scheme, _, key = _header(scope, b"authorization").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key)


class BodyTooLarge(HTTPException):
    """Raised from the body reader; FastAPI passes HTTPExceptions through its body parsing."""


class BodyGuardMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["method"] == "POST" and "json" not in _header(scope, b"content-type"):
            scope = _as_json(scope)
        encoding = _header(scope, b"content-encoding").strip().lower() or "identity"
        if encoding != "identity":
            # Read as JSON, a compressed body would fail with a misleading UTF-8 error.
            error = ApiError(
                415,
                f"Content-Encoding {encoding} is not supported; send the body uncompressed",
                code="unsupported_content_encoding",
            )
            return await error_response(path, error)(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await error_response(path, self._too_large())(scope, receive, send)
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
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await error_response(path, self._too_large())(scope, receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than {self.max_body_bytes} bytes (--max-body-bytes)")


def _header(scope, name: bytes) -> str:
    """The first value of a header, '' when absent (ASGI header names are lower-case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


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

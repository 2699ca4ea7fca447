"""Errors of the HTTP API, shaped for the route family that answers them.

``/v1/*`` and vLLM's utility routes answer in OpenAI's shape, so that SDKs raise their matching
exception classes; every other route answers in the tutorial's shape (``error``, ``status``, ``time``).
"""

from __future__ import annotations

import datetime

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
OPENAI_SHAPED_PATHS = ("/v1", "/tokenize", "/detokenize", "/version")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def now_text() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def error_body(path: str, error: ApiError) -> dict:
    if path.startswith(OPENAI_SHAPED_PATHS):
        return {
            "error": {
                "message": error.message,
                "type": ERROR_TYPES.get(error.status, "server_error"),
                "param": error.param,
                "code": error.code,
            }
        }
    return {"error": error.message, "status": error.status, "time": now_text()}


def error_response(path: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)

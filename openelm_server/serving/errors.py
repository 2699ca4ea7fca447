"""Errors of the HTTP API, shaped for the route family that answers them.

``/v1/*`` and vLLM's utility routes answer in OpenAI's shape, so that SDKs raise their matching
exception classes; every other route answers in the legacy API's shape (``error``, ``status``, ``time``).
A request pydantic refuses is a 400 whose message names the user's field as they wrote it.
"""

from __future__ import annotations

import datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
        elif item.get("type") == "extra_forbidden":
            field_errors.setdefault(location, []).append("not supported by this server; leave it out")
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


def install_error_handlers(app: FastAPI) -> None:
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

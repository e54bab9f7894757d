"""JSON errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).

Every failure the API returns goes through here, so a client sees one shape with a message a
person can act on. ``code`` carries the HTTP status, as vLLM's OpenAI server does.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmesh.api.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


ROUTES = (
    "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /api/cluster, "
    "GET /api/events, PUT /api/shards, PUT /api/model, GET /api/health, the console's /api "
    "routes (runs, jobs, placement/preview, console/config) and the console at /console/ "
    "(all of the API in GET /openapi.json)"
)


class ApiError(Exception):
    """Raise from a route or dependency to answer with ``status`` and ``message``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    detail = ErrorDetail(
        message=message,
        type=ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        param=param,
        code=status,
    )
    return ErrorResponse(error=detail).model_dump()


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One actionable sentence for pydantic's error list (first offending field)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return (
            f"the request body is not valid JSON ({reason}); send a JSON object with "
            "'Content-Type: application/json'",
            None,
        )
    if loc == ["body"] and first.get("type") in {"missing", "model_attributes_type", "dict_type"}:
        return "the request body must be a JSON object", None
    where = loc[0] if loc else "body"
    param = loc[1] if len(loc) > 1 else None
    if param is None:
        return f"invalid {where}: {first.get('msg')}", None
    # a union field (prompt: str | list[str]) yields one error per alternative
    same = [e for e in errors if [str(x) for x in e.get("loc", ())][:2] == loc[:2]]
    msgs = sorted({str(e.get("msg", "")).removeprefix("Input should be ") for e in same})
    if first.get("type") == "missing":
        return f"{param}: this field is required", param
    if first.get("type") == "extra_forbidden":
        return f"{param}: unknown field; this API does not take it (see /openapi.json)", param
    got = first.get("input")
    got_text = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    return f"{param}: should be {' or '.join(msgs)} (got {got_text})", param


async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.headers)


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe_validation(list(exc.errors()))
    return error_response(400, message, param)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; the API serves {ROUTES}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, None, getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        500, f"internal error ({type(exc).__name__}: {exc}); see the API replica's log"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

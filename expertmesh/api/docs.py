"""The published OpenAPI schema (``GET /openapi.json``), made to say what the API answers.

FastAPI documents a 422 for every route with a body or parameters; this API answers 400 in
OpenAI's error shape instead (``errors.py``), so the schema says that: clients and schema
fuzzers (Schemathesis, in ``tests/integration/test_api_schema.py``) check responses against it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with 422 replaced by 400 (ErrorResponse) and 500 documented."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None or "400" not in responses:
                responses.setdefault("400", _error("Invalid request (the message names the field)"))
            responses.setdefault("500", _error("Internal error"))
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    """Serve :func:`openapi_schema` (built once, on the first request for it)."""

    def cached() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app)
        return app.openapi_schema

    app.openapi = cached  # type: ignore[method-assign]

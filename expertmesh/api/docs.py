"""The published OpenAPI schema (``GET /openapi.json``), made to say what the API answers, and
Swagger UI for it (``GET /docs``).

FastAPI documents a 422 for every route with a body or parameters; this API answers 400 in
OpenAI's error shape instead (``errors.py``), so the schema says that: clients and schema
fuzzers (Schemathesis, in ``tests/integration/test_api_schema.py``) check responses against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

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


def install_ui(app: FastAPI, ui: Path | None, mount: str = "/console") -> None:
    """``GET /docs``: Swagger UI from the console's vendored copy (``ui/vendor``, served under
    ``mount``), so that it works where the browser cannot reach a CDN, as on many GPU
    clusters. Without the console's files it falls back to FastAPI's CDN links."""
    vendored = ui is not None and (ui / "vendor" / "swagger-ui-bundle.js").is_file()

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = {}
        if vendored:
            assets = {
                "swagger_js_url": f"{root}{mount}/vendor/swagger-ui-bundle.js",
                "swagger_css_url": f"{root}{mount}/vendor/swagger-ui.css",
                "swagger_favicon_url": "data:,",  # the console's (none): nothing to fetch
            }
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} API", **assets
        )

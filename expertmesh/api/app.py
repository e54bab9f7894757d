"""The HTTP API: a FastAPI app served by a Ray Serve ingress deployment.

The app is built inside the Serve replica (``__serve_build_asgi_app__``) from
:class:`ApiSettings`; it reaches the controller and router actors by name. The replica keeps
only a SHA-256 digest of the token.

Example::

    cluster = expertmesh.connect()
    cluster.deploy("expertmesh-tiny", shards=4)
    url = cluster.serve(port=8000)  # token: EXPERTMESH_TOKEN, else generated (see api.json)
"""

from __future__ import annotations

import secrets
import time

from fastapi import Depends, FastAPI
from ray import serve

from expertmesh import envs
from expertmesh.api import docs, info
from expertmesh.api.deps import ApiSettings, Services, reject_unknown_query, token_digest
from expertmesh.api.errors import install_error_handlers
from expertmesh.api.limits import BodySizeLimit
from expertmesh.api.routes import chat, cluster, completions, console, health, lineage, models
from expertmesh.types import ClusterError

APP_NAME = "expertmesh-api"


def create_app(settings: ApiSettings) -> FastAPI:
    """The FastAPI app (routes per resource, JSON errors, body size limit, OpenAPI schema)."""
    # NOTE: /openapi.json and /docs need no token: the schema describes the routes and holds
    # no data; every route that reads or changes the cluster still needs the token
    app = FastAPI(
        title="expertmesh",
        summary="OpenAI-compatible completions and chat, and the cluster's /api routes",
        version=_version(),
        docs_url=None,  # docs.install_ui serves Swagger UI from the console's vendored copy
        redoc_url=None,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.services = Services(settings)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (health, completions, chat, models, cluster, lineage, console):
        app.include_router(module.router)
    docs.install(app)
    ui = console.ui_dir()
    docs.install_ui(app, ui)
    if ui is not None:  # the console's static files: no token (they hold no data)
        from fastapi.staticfiles import StaticFiles

        app.mount("/console", StaticFiles(directory=ui, html=True), name="console")
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("expertmesh")
    except PackageNotFoundError:
        return "0"


@serve.deployment(
    name="ApiIngress",
    num_replicas=1,
    # NOTE: streams and batched prompts wait on the router, not on CPU; and past this Serve
    # would queue requests itself, without a bound or an answer, where the router's own
    # admission (max_batch + max_queued sequences, then a 429) should answer them
    max_ongoing_requests=4096,
    ray_actor_options={"num_cpus": 0.1},  # it waits on actors; shards need the CPUs
)
@serve.ingress()
class ApiIngress:
    """The Serve replica; it builds the app once its settings arrive."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings)


def _wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/api/health", timeout=2.0, trust_env=False)
            if resp.status_code == 200 and "model_ready" in resp.json():
                return
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise ClusterError(
        f"the API did not answer on {url} within {timeout_s:.0f}s ({last}); is the port "
        "taken by another program, or Serve already running on another port?"
    )


def start_api(
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    max_body_bytes: int = 1024 * 1024,
    max_prompts: int = 64,
    max_concurrent_per_token: int | None = None,
) -> str:
    """Serve the API on ``host:port`` (loopback unless told otherwise); returns its base URL.

    Args:
        host: address Serve's HTTP proxy binds; "0.0.0.0" exposes the API to the network.
        port: the proxy's port.
        token: the bearer token clients must send; default ``EXPERTMESH_TOKEN``, else a new
            random one. It is written to ``$EXPERTMESH_HOME/api.json`` (mode 0600).
        max_body_bytes: larger request bodies get 413.
        max_prompts: most prompts one completion request may carry.
        max_concurrent_per_token: most completion and chat requests one API token may have in
            flight; more get 429 with ``Retry-After``. None: no limit.

    Returns:
        The base URL, e.g. ``"http://127.0.0.1:8000"``.
    """
    token = token or envs.api_token() or secrets.token_urlsafe(24)
    settings = ApiSettings(
        token_sha256=token_digest(token),
        max_body_bytes=max_body_bytes,
        max_prompts=max_prompts,
        max_concurrent_per_token=max_concurrent_per_token,
    )
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as exc:  # the proxy could not bind: say so without Ray's traceback
        cause = getattr(exc, "cause", None) or exc
        raise ClusterError(
            f"cannot serve the API on {host}:{port} ({cause}); is the port taken? "
            "choose another one (--port)"
        ) from None
    serve.run(ApiIngress.bind(settings), name=APP_NAME, route_prefix="/")
    client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{client_host}:{port}"
    _wait_healthy(url, timeout_s=60.0)
    info.write_info(info.api_file(), info.ApiInfo(url=url, token=token))
    return url

"""Dependencies of the routes: settings, bearer-token auth and the cluster's actors.

Routes take them as ``Annotated`` aliases (``ServicesDep``, ``SettingsDep``); every router but
health's carries :func:`require_token`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import ray
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from expertmesh.actors import names
from expertmesh.api.errors import ApiError
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.types import (
    CapacityError,
    Overloaded,
    ScaleInProgressError,
    UpgradeInProgressError,
)

NO_MODEL = (
    "no model is deployed; start one with `expertmesh up --model NAME_OR_URI` or "
    "`expertmesh.connect().deploy(model)`"
)


# before each try of a call to an actor: about 10 s in all, as long as a detached controller's
# restart took on a loaded 2-core machine (3 s was too short there)
RESTART_WAITS_S = (0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0)


def token_digest(token: str) -> str:
    """What the server keeps of the token (the replica never holds the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(kw_only=True, slots=True)
class ApiSettings:
    """Fixed for the life of the API deployment."""

    token_sha256: str
    max_body_bytes: int = 1024 * 1024
    max_prompts: int = 64  # prompts per completion request
    model_cache_s: float = 5.0  # how long a looked-up deployed model name is trusted
    # completions and chat completions one API token may have in flight (None: no limit)
    max_concurrent_per_token: int | None = None

    def __post_init__(self) -> None:
        limit = self.max_concurrent_per_token
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ConfigError("max_concurrent_per_token", f"must be an integer, got {limit!r}")
        if limit is not None and limit < 1:
            raise ConfigError("max_concurrent_per_token", f"must be >= 1 or None, got {limit}")


@dataclass(kw_only=True, slots=True)
class DeployedModel:
    name: str
    checkpoint_uri: str | None


class NotDeployed(ApiError):
    """The controller or router actor does not exist (nothing deployed in this Ray cluster)."""

    def __init__(self) -> None:
        super().__init__(503, NO_MODEL)


class Services:
    """Named Ray actors (controller, router), looked up once and again after they restart."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._model: tuple[float, DeployedModel | None] | None = None
        self.in_flight: dict[str, int] = {}  # token digest -> generation requests running

    async def _actor(self, name: str) -> ray.actor.ActorHandle:
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=names.NAMESPACE)
            except ValueError:
                raise NotDeployed() from None
            self._handles[name] = handle
        return handle

    async def call(self, actor: str, method: str, *args: Any) -> Any:
        """``await actor.method.remote(*args)``; errors come back as :class:`ApiError`.

        NOTE: an actor that is restarting (the controller is detached and restarts by itself)
        is retried for a few seconds before the documented 503 (issue 23 §2: /api/cluster
        answered 503 while the controller restarted); the 503 then says when to retry."""
        for wait_s in RESTART_WAITS_S:
            await asyncio.sleep(wait_s)
            try:
                return await _invoke(await self._actor(actor), method, args)
            except ray.exceptions.RayActorError:
                self._handles.pop(actor, None)  # redeployed or restarting: look it up again
        raise ApiError(
            503,
            f"the {actor} actor is unavailable (restarting?); retry shortly",
            headers={"Retry-After": "2"},
        )

    async def stream(
        self,
        prompt: str,
        params: dict[str, Any],
        index: int,
        request_id: str,
        total: int,
        routing: bool = False,
    ) -> Any:
        """The router's per-token generator (an async iterator of object refs) for choice
        ``index`` of ``prompt``, one of ``total`` sequences of the request; its first item says
        the router admitted it. ``routing``: items carry the experts of their tokens."""
        handle = await self._actor(names.ROUTER)
        gen = handle.generate_stream.options(num_returns="streaming")
        return gen.remote(prompt, params, index, request_id, True, total, routing)

    def cancel(self, request_id: str) -> None:
        """Tell the router to stop ``request_id``'s sequences (its client went away).

        Fire and forget: it runs while the caller is being cancelled, so it awaits nothing."""
        handle = self._handles.get(names.ROUTER)
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.cancel.remote(request_id)

    async def has_router(self) -> bool:
        """Whether a router is up now (a fresh lookup: the cached handle may be of a dead one)."""
        self._handles.pop(names.ROUTER, None)
        try:
            await self._actor(names.ROUTER)
        except NotDeployed:
            return False
        return True

    async def deployed_model(self, *, fresh: bool = False) -> DeployedModel | None:
        """The deployed model's name, from the controller (cached ``model_cache_s``)."""
        now = time.monotonic()
        if not fresh and self._model and now - self._model[0] < self.settings.model_cache_s:
            return self._model[1]
        try:
            status = await self.call(names.CONTROLLER, "status")
        except NotDeployed:
            status = {}
        model = None
        if status.get("model"):
            model = DeployedModel(name=status["model"], checkpoint_uri=status["checkpoint_uri"])
        self._model = (now, model)
        return model

    async def require_model(self, requested: str | None, *, fresh: bool = False) -> DeployedModel:
        """The deployed model if ``requested`` names it (or is None); else 404 / 503."""
        model = await self.deployed_model(fresh=fresh)
        if model is None or requested not in (None, model.name):
            model = await self.deployed_model(fresh=True)  # maybe it was just (re)deployed
        if model is None:
            raise ApiError(503, NO_MODEL)
        if requested not in (None, model.name):
            raise ApiError(
                404,
                f"model {requested!r} is not deployed; this cluster serves {model.name!r} "
                "(see GET /v1/models)",
                param="model",
            )
        return model


async def _invoke(handle: ray.actor.ActorHandle, method: str, args: tuple[Any, ...]) -> Any:
    try:
        return await getattr(handle, method).remote(*args)
    except ray.exceptions.RayTaskError as exc:  # the method raised: its own error, as JSON
        raise as_api_error(exc.cause if exc.cause is not None else exc) from None


def as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), param=exc.field)
    if isinstance(exc, UpgradeInProgressError | ScaleInProgressError):
        return ApiError(409, str(exc))
    if isinstance(exc, CapacityError):
        return ApiError(409, str(exc), param="shards")
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, LookupError):  # a registered model or version that does not exist
        return ApiError(404, str(exc).strip("'\""), param="model")
    if isinstance(exc, CheckpointError):
        return ApiError(400, str(exc), param="model")
    return ApiError(500, f"{type(exc).__name__}: {exc}")


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.services.settings


def after_response() -> Iterator[contextlib.ExitStack]:
    """Callbacks to run once the response has been sent, or abandoned (the client went away
    before or while it streamed): FastAPI closes this dependency after the response."""
    with contextlib.ExitStack() as stack:
        yield stack


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
AfterResponseDep = Annotated[contextlib.ExitStack, Depends(after_response)]

HOW_TO_AUTH = (
    "send the API token as 'Authorization: Bearer <token>' (`expertmesh up` prints it; it is "
    "also in $EXPERTMESH_HOME/cluster.json)"
)


# NOTE: FastAPI's own bearer scheme, so that the OpenAPI schema declares the token
# (securitySchemes) and /docs offers to send it; the checks and messages stay ours
# (auto_error=False), and the raw header is read for them.
bearer = HTTPBearer(auto_error=False, description="the API token (`expertmesh up` prints it)")


async def require_token(
    request: Request,
    settings: SettingsDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """401 unless the request carries the API's bearer token."""
    authorization = request.headers.get("authorization")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise ApiError(401, f"missing API token: {HOW_TO_AUTH}", headers=challenge)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, f"malformed Authorization header: {HOW_TO_AUTH}", headers=challenge)
    given = token_digest(token.strip())
    if not secrets.compare_digest(given, settings.token_sha256):
        raise ApiError(401, f"invalid API token: {HOW_TO_AUTH}", headers=challenge)


async def token_slot(request: Request, services: ServicesDep) -> AsyncIterator[None]:
    """Hold one of the token's ``max_concurrent_per_token`` generation slots for the request
    (released once its response, streamed or not, has been sent); 429 if none is free.

    NOTE: counted per API replica (the app runs one by default); the router's own queue bound
    (``max_queued``) is the deployment-wide one."""
    limit = services.settings.max_concurrent_per_token
    if limit is None:
        yield
        return
    # require_token ran first: the header holds a valid bearer token
    key = token_digest(request.headers["authorization"].partition(" ")[2].strip())
    held = services.in_flight.get(key, 0)
    if held >= limit:
        raise ApiError(
            429,
            f"this API token has {held} completion requests in flight, its limit "
            f"(max_concurrent_per_token={limit}); wait for one to finish",
            headers={"Retry-After": "1"},
        )
    services.in_flight[key] = held + 1
    try:
        yield
    finally:
        left = services.in_flight[key] - 1
        if left:
            services.in_flight[key] = left
        else:
            del services.in_flight[key]


async def reject_unknown_query(request: Request) -> None:
    """400 naming a query parameter the route does not take: it would otherwise be ignored,
    and a client would believe it took effect."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    stack = [dependant]
    while stack:  # the route's own query parameters and its dependencies'
        d = stack.pop()
        known.update(p.alias for p in d.query_params)
        stack.extend(d.dependencies)
    for name in request.query_params:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ApiError(
                400,
                f"{name}: unknown query parameter (this route takes: {allowed})",
                param=name,
            )

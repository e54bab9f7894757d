"""``/api/...``: cluster state (shards, placement, per-expert load), events and scaling."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from expertmesh.actors import names
from expertmesh.actors.events import MAX_PAGE
from expertmesh.api.deps import ServicesDep, require_token
from expertmesh.api.schemas import (
    ClusterStatus,
    ErrorResponse,
    EventsPage,
    ScaleAccepted,
    ScaleRequest,
)

router = APIRouter(
    prefix="/api",
    tags=["cluster"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 503)},
)


@router.get("/cluster", response_model=ClusterStatus)
async def cluster_status(services: ServicesDep) -> ClusterStatus:
    """Nodes, shards (with their experts and load), the placement table and router stats."""
    return await services.call(names.CONTROLLER, "status")


@router.get("/events", response_model=EventsPage)
async def cluster_events(
    services: ServicesDep,
    after_seq: Annotated[
        int, Query(ge=0, description="only events with a higher seq (a page's `next`)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="most events in the page")] = (
        MAX_PAGE
    ),
    since: Annotated[float, Query(ge=0, description="Unix time; only newer events")] = 0.0,
) -> EventsPage:
    """Failures, placement changes and scaling events, oldest first, a page at a time.

    The log is persisted (it survives controller restarts) and bounded (the oldest events go
    first; ``first_seq`` says which is the oldest kept). Follow it by passing each page's
    ``next`` as ``after_seq``."""
    return await services.call(names.CONTROLLER, "get_events", since, after_seq, limit)


@router.put(
    "/shards",
    status_code=202,
    response_model=ScaleAccepted,
    responses={409: {"model": ErrorResponse}},
)
async def scale_shards(body: ScaleRequest, services: ServicesDep) -> ScaleAccepted:
    """Start growing or shrinking the expert shard pool to ``shards`` actors, live.

    Answers at once with the scale's id; the events with that ``scale_id`` (``scale_started``,
    ``shard_started``/``shard_stopped``, ``placement``, then ``scale_finished`` or
    ``scale_failed``) say how it goes. Refused before anything starts: 400 (param ``shards``)
    below the deployment's ``min_replicas`` or above its ``max_shards``; 409 beyond what the
    cluster can place now (the message names the limit), or while another scale or an upgrade
    runs (the message names it)."""
    await services.require_model(None, fresh=True)
    return await services.call(names.CONTROLLER, "scale", body.shards)

"""``/api/...``: cluster state (shards, placement, per-expert load), events and scaling."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from expertmesh.actors import names
from expertmesh.api.deps import ServicesDep, require_token
from expertmesh.api.schemas import ClusterStatus, ErrorResponse, Event, ScaleRequest

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


@router.get("/events", response_model=list[Event])
async def cluster_events(
    services: ServicesDep,
    since: Annotated[float, Query(ge=0, description="Unix time; only newer events")] = 0.0,
) -> list[Event]:
    """Failures, placement changes and scaling events, oldest first."""
    return await services.call(names.CONTROLLER, "get_events", since)


@router.put("/shards", response_model=ClusterStatus)
async def scale_shards(body: ScaleRequest, services: ServicesDep) -> ClusterStatus:
    """Grow or shrink the expert shard pool to ``shards`` actors, live; returns the new status."""
    await services.require_model(None, fresh=True)
    return await services.call(names.CONTROLLER, "scale", body.shards)

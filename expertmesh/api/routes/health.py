"""``GET /api/health``: liveness for probes and `expertmesh up`.

It needs no token: it reveals only that the API answers and whether a model is loaded.
"""

from __future__ import annotations

from fastapi import APIRouter

from expertmesh.api.deps import ServicesDep
from expertmesh.api.schemas import Health

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health", response_model=Health)
async def health(services: ServicesDep) -> Health:
    return Health(model_ready=await services.has_router())

"""``GET /v1/models``: the deployed model, in OpenAI's list format; ``PUT /api/model``: upgrade."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from expertmesh.actors import names
from expertmesh.api.deps import ServicesDep, require_token
from expertmesh.api.schemas import (
    ClusterStatus,
    ErrorResponse,
    ModelCard,
    ModelList,
    UpgradeRequest,
)

router = APIRouter(
    tags=["models"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 503)},
)

_STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList)
async def list_models(services: ServicesDep) -> ModelList:
    """The models this cluster serves (empty while nothing is deployed)."""
    model = await services.deployed_model(fresh=True)
    cards = (
        []
        if model is None
        else [ModelCard(id=model.name, created=_STARTED, root=model.checkpoint_uri)]
    )
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    model = await services.require_model(model_id)
    return ModelCard(id=model.name, created=_STARTED, root=model.checkpoint_uri)


@router.put("/api/model", response_model=ClusterStatus)
async def upgrade_model(body: UpgradeRequest, services: ServicesDep) -> ClusterStatus:
    """Serve another registered version live (``{"model": "NAME/VER"}``): no request fails,
    requests in flight finish on the old version. 404: no such version; 400: a different
    dense shape; 409: an upgrade is already in progress. Returns the status after it, with
    what the upgrade did under ``"upgraded"``."""
    await services.require_model(None, fresh=True)
    out = await services.call(names.CONTROLLER, "upgrade", body.model)
    await services.deployed_model(fresh=True)  # the served name may have changed
    return out

"""``GET /v1/models``: the deployed model, in OpenAI's list format."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from expertmesh.api.deps import ServicesDep, require_token
from expertmesh.api.schemas import ErrorResponse, ModelCard, ModelList

router = APIRouter(
    tags=["models"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (401, 404)},
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

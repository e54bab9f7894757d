"""``GET /api/models/{name}/versions``: a registered model's versions and their lineage tree.

The console draws the tree; every version carries what made it (pipeline, parent, trained
parts, data and config digests, Ray job, git revision) and its MLflow aliases (``@serving``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from expertmesh.api.deps import require_token
from expertmesh.api.errors import ApiError
from expertmesh.api.schemas import ErrorResponse

router = APIRouter(
    prefix="/api",
    tags=["models"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (401, 404)},
)


class ModelVersionOut(BaseModel):
    name: str
    version: str
    ref: str = Field(description="name/version")
    parent: str = Field(description='the parent\'s "name/version"; "" for a root')
    pipeline: str
    trained_parts: str
    domains: list[str]
    aliases: list[str]
    run_id: str | None
    source: str = Field(description="the checkpoint's URI")
    tags: dict[str, str] = Field(description="every lineage tag, as MLflow holds it")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the latest metrics of the run that made it"
    )
    children: list[ModelVersionOut]


class ModelVersions(BaseModel):
    name: str
    versions: list[ModelVersionOut] = Field(description="roots of the lineage tree")


def _lineage(name: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    from expertmesh.platform.lineage import lineage_tree
    from expertmesh.platform.tracking import Tracker

    tracker = Tracker()
    versions = tracker.versions(name)
    metrics: dict[str, dict[str, float]] = {}
    for run_id in {v.run_id for v in versions if v.run_id}:
        try:
            metrics[run_id] = dict(tracker.client.get_run(run_id).data.metrics)
        except MlflowException:  # the run was deleted; the version stays
            metrics[run_id] = {}

    def with_metrics(node: dict) -> dict:
        node["metrics"] = metrics.get(node["run_id"] or "", {})
        node["children"] = [with_metrics(c) for c in node["children"]]
        return node

    return [with_metrics(node.to_dict()) for node in lineage_tree(versions)]


@router.get("/models/{name}/versions", response_model=ModelVersions)
async def model_versions(name: str) -> ModelVersions:
    """Every registered version of ``name``, as a tree from the versions without a parent here."""
    roots = await asyncio.to_thread(_lineage, name)  # MLflow's client blocks
    if not roots:
        raise ApiError(404, f"no registered model named {name!r}", param="name")
    return ModelVersions(name=name, versions=[ModelVersionOut(**r) for r in roots])

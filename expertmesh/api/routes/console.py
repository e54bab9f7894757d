"""What the web console needs beyond the other routes: links, registry, runs, jobs and a
placement preview; and the console's own files at ``/console``.

The console is static files (``ui/``, no build step) that call these routes with the same
bearer token as any client; the server keeps no per-session state, so any API replica answers.
The files themselves need no token: they hold no data.
"""

from __future__ import annotations

import asyncio
import site
import sysconfig
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.actors import names
from expertmesh.api.deps import ServicesDep, require_token
from expertmesh.api.errors import ApiError
from expertmesh.api.schemas import ErrorResponse

router = APIRouter(
    prefix="/api",
    tags=["console"],
    dependencies=[Depends(require_token)],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 503)},
)

NO_JOB_SERVER = (
    "this cluster has no Ray job server: start it with its dashboard (`expertmesh up "
    "--dashboard-port 8265`, or LocalRayOptions(dashboard=True)) to run pipelines as jobs"
)
# what the console's job form may submit (the pipelines a person starts by hand)
Pipeline = Literal["train", "finetune", "add_expert", "federated"]
SUBMITTABLE: tuple[str, ...] = get_args(Pipeline)


def ui_dir() -> Path | None:
    """The console's files: installed with the wheel (``<data>/share/expertmesh/ui``, the data
    folder of the install scheme: the venv, or the user's base for ``pip install --user``),
    else the repository's ``ui/`` (an editable install); None when neither exists."""
    share = Path("share") / "expertmesh" / "ui"
    candidates = [Path(sysconfig.get_path("data")) / share, Path(site.USER_BASE or "") / share]
    candidates.append(Path(__file__).resolve().parents[3] / "ui")
    for candidate in candidates:
        if (candidate / "index.html").is_file():
            return candidate
    return None


# ---------------------------------------------------------------------- schemas
class ConsoleConfig(BaseModel):
    ray_dashboard_url: str | None = Field(description="the Ray dashboard, when the cluster has one")
    mlflow_ui_url: str | None = Field(
        description="the MLflow UI, when tracking is an MLflow server"
    )
    tracking_uri: str | None
    job_server: bool = Field(description="whether pipelines can be submitted as Ray jobs")
    registered_models: list[str]
    pipelines: list[str] = Field(description="pipelines the job form may submit")


class RunOut(BaseModel):
    run_id: str
    run_name: str | None
    experiment: str
    status: str
    start_time: int | None
    end_time: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


class JobOut(BaseModel):
    submission_id: str
    status: str
    entrypoint: str
    pipeline: str | None
    message: str | None
    start_time: int | None
    end_time: int | None


class JobList(BaseModel):
    job_server: bool
    message: str | None = Field(description="why there are no jobs, when there is no job server")
    jobs: list[JobOut]


class JobLogs(BaseModel):
    submission_id: str
    logs: str


class JobRequest(BaseModel):
    """``POST /api/jobs``: run pipeline ``pipeline`` with ``args`` as its flags."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Pipeline
    args: dict[str, str | int | float | bool | list[str | int | float]] = Field(
        default_factory=dict,
        description='flags: {"steps": 50} -> --steps 50, a list comma-joined ("set" repeats)',
    )


class PlacementMove(BaseModel):
    kind: str
    layer: int
    expert: int
    shard_id: str


class PlacementPreview(BaseModel):
    current_shards: int
    target_shards: int
    new_shards: list[str] = Field(description="placeholder ids of shards a scale-out starts")
    drain: list[str] = Field(description="shards a scale-in drains and stops")
    moves: list[PlacementMove]
    replicas_before: dict[str, list[str]]
    replicas_after: dict[str, list[str]]
    warnings: list[str]


# ---------------------------------------------------------------------- helpers
def _cluster_settings() -> Any:
    from expertmesh import published

    try:
        return published.read()
    except Exception:  # no settings published (a cluster started without expertmesh)
        return None


def _config() -> dict[str, Any]:
    from expertmesh.platform.tracking import Tracker

    settings = _cluster_settings()
    tracker = Tracker(settings.tracking_uri if settings else None)
    models = sorted(m.name for m in tracker.client.search_registered_models())
    job_server = settings.job_server if settings else None
    http = tracker.uri.startswith(("http://", "https://"))
    return {
        "ray_dashboard_url": job_server,  # the job server is the dashboard
        "mlflow_ui_url": tracker.uri.rstrip("/") if http else None,
        "tracking_uri": tracker.uri,
        "job_server": job_server is not None,
        "registered_models": models,
        "pipelines": list(SUBMITTABLE),
    }


def _runs(limit: int) -> list[dict[str, Any]]:
    from expertmesh.platform.tracking import Tracker

    settings = _cluster_settings()
    tracker = Tracker(settings.tracking_uri if settings else None)
    out: list[dict[str, Any]] = []
    for exp in tracker.client.search_experiments():
        for run in tracker.recent_runs(exp.name, max_results=limit):
            out.append({**run, "experiment": exp.name})
    out.sort(key=lambda r: r["start_time"] or 0, reverse=True)
    return out[:limit]


def _job_client() -> Any:
    from expertmesh.jobs import JobClient, JobError

    settings = _cluster_settings()
    if settings is None or not settings.job_server:
        raise ApiError(503, NO_JOB_SERVER)
    try:
        return JobClient(settings.job_server)
    except JobError as exc:
        raise ApiError(503, str(exc)) from None


def _job_out(info: Any) -> JobOut:
    from dataclasses import asdict

    return JobOut(**asdict(info))


def preview(status: dict[str, Any], target: int) -> dict[str, Any]:
    """The placement change scaling to ``target`` shards would make (pure: no side effects).

    New shards get placeholder ids (``new-1``...) on the live nodes in turn; the controller
    may use warm spares instead, which start with the same (empty) experts.
    """
    from expertmesh.platform import placement as pl

    table = pl.PlacementTable(
        version=int(status.get("placement_version") or 0),
        replicas={
            tuple(int(x) for x in k.split(":")): tuple(v)
            for k, v in (status.get("placement") or {}).items()
        },
    )
    shards = [
        pl.ShardInfo(shard_id=s["shard_id"], node_id=s["node_id"])
        for s in status.get("shards", [])
        if not s.get("draining")
    ]
    load = {
        tuple(int(x) for x in k.split(":")): float(v)
        for k, v in (status.get("expert_load") or {}).items()
    }
    min_replicas = int(status.get("min_replicas") or 1)
    new: list[pl.ShardInfo] = []
    if target > len(shards):
        nodes = [n["node_id"] for n in status.get("nodes", []) if n.get("alive")] or ["?"]
        new = [
            pl.ShardInfo(shard_id=f"new-{i + 1}", node_id=nodes[i % len(nodes)])
            for i in range(target - len(shards))
        ]
        plan = pl.scale_out(table, shards, new, load, min_replicas=min_replicas)
    elif target < len(shards):
        plan = pl.scale_in(
            table, shards, load, count=len(shards) - target, min_replicas=min_replicas
        )
    else:
        plan = pl.PlacementPlan(table=table, moves=())

    def as_map(t: pl.PlacementTable) -> dict[str, list[str]]:
        return {f"{k[0]}:{k[1]}": list(v) for k, v in sorted(t.replicas.items())}

    return {
        "current_shards": len(shards),
        "target_shards": target,
        "new_shards": [s.shard_id for s in new],
        "drain": list(plan.drain),
        "moves": [
            {"kind": m.kind, "layer": m.expert[0], "expert": m.expert[1], "shard_id": m.shard_id}
            for m in plan.moves
        ],
        "replicas_before": as_map(table),
        "replicas_after": as_map(plan.table),
        "warnings": list(plan.warnings),
    }


# ---------------------------------------------------------------------- routes
@router.get("/console/config", response_model=ConsoleConfig)
async def console_config() -> ConsoleConfig:
    """Links out (Ray dashboard, MLflow UI), registered models and whether jobs can run."""
    return ConsoleConfig(**await asyncio.to_thread(_config))


@router.get("/runs", response_model=list[RunOut])
async def list_runs(
    limit: Annotated[int, Query(ge=1, le=500, description="newest runs to return")] = 50,
) -> list[RunOut]:
    """Pipeline runs from MLflow (every experiment), newest first."""
    return [RunOut(**r) for r in await asyncio.to_thread(_runs, limit)]


@router.get("/jobs", response_model=JobList)
async def list_jobs() -> JobList:
    """Ray jobs on this cluster's job server, newest first (none, and why, without one)."""
    try:
        client = await asyncio.to_thread(_job_client)
    except ApiError as exc:
        return JobList(job_server=False, message=exc.message, jobs=[])
    jobs = await asyncio.to_thread(client.list)
    return JobList(job_server=True, message=None, jobs=[_job_out(j) for j in jobs])


@router.get("/jobs/{submission_id}/logs", response_model=JobLogs)
async def job_logs(submission_id: str) -> JobLogs:
    """The job's driver log so far."""
    from expertmesh.jobs import JobError

    client = await asyncio.to_thread(_job_client)
    try:
        await asyncio.to_thread(client.info, submission_id)
    except JobError as exc:
        raise ApiError(404, str(exc), param="submission_id") from None
    logs = await asyncio.to_thread(client.logs, submission_id)
    return JobLogs(submission_id=submission_id, logs=logs)


@router.post("/jobs", response_model=JobOut)
async def submit_job(body: JobRequest) -> JobOut:
    """Submit a pipeline (train, finetune, add_expert, federated) as a Ray job."""
    from expertmesh.jobs import pipeline_args

    if body.pipeline not in SUBMITTABLE:
        raise ApiError(
            400,
            f"pipeline: {body.pipeline!r} cannot be submitted here; one of {', '.join(SUBMITTABLE)}",
            param="pipeline",
        )
    client = await asyncio.to_thread(_job_client)
    info = await asyncio.to_thread(client.submit, body.pipeline, pipeline_args(**body.args))
    return _job_out(info)


@router.get("/placement/preview", response_model=PlacementPreview)
async def placement_preview(
    services: ServicesDep,
    shards: Annotated[int, Query(ge=1, le=1024, description="the target shard count")],
) -> PlacementPreview:
    """What scaling to ``shards`` would change: replicas added and dropped, shards drained."""
    await services.require_model(None)
    status = await services.call(names.CONTROLLER, "status")
    from expertmesh.platform.placement import PlacementError

    try:
        return PlacementPreview(**preview(status, shards))
    except PlacementError as exc:
        raise ApiError(400, f"shards: {exc}", param="shards") from None

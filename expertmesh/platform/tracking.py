"""MLflow tracking: runs, metrics, checkpoints as artifacts, registry versions with lineage.

Embedded default: a SQLite backend store and artifact folder under the state folder
(``EXPERTMESH_HOME``); ``MLFLOW_TRACKING_URI`` points at a server instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertmesh import envs

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
TAG_CHECKPOINT = "expertmesh.checkpoint_uri"


def default_tracking_uri() -> str:
    uri = envs.mlflow_tracking_uri()
    if uri:
        return uri
    db = envs.home() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _artifact_root() -> str:
    root = envs.home() / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


@dataclass(kw_only=True, slots=True)
class ModelVersionInfo:
    name: str
    version: str
    source: str  # where the checkpoint's files are (a pyarrow.fs URI or local path)
    run_id: str | None
    tags: dict[str, str]


class Tracker:
    """A thin, typed wrapper over :class:`mlflow.MlflowClient` used by every pipeline."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        import mlflow

        self.uri = tracking_uri or default_tracking_uri()
        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.run_id: str | None = None

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None if envs.mlflow_tracking_uri() else _artifact_root()
        return self.client.create_experiment(
            name, artifact_location=location and f"{location}/{name}"
        )

    @contextlib.contextmanager
    def run(
        self,
        experiment: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[str]:
        """Start (or resume, given ``run_id``) a run; marks it FAILED if the body raises."""
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id(experiment), run_name=run_name, tags=dict(tags or {})
            )
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        else:
            self.client.set_terminated(run_id, status="FINISHED")
        finally:
            self.run_id = None

    def _active(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no active run; use `with tracker.run(...)`")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._active(), params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self._active(), metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self._active(), k, str(v))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        """Copy a folder into the run's artifacts; returns the artifact URI of that folder."""
        run_id = self._active()
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        root = self.client.get_run(run_id).info.artifact_uri
        return f"{root.rstrip('/')}/{artifact_path}"

    def register_version(
        self, name: str, *, source: str, run_id: str | None, tags: Mapping[str, Any]
    ) -> ModelVersionInfo:
        """Register ``source`` (a checkpoint) as a new version of registered model ``name``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="expertmesh MoE model")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(
                exc
            ):
                raise
        str_tags = {k: str(v) for k, v in tags.items()} | {TAG_CHECKPOINT: source}
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=str_tags)
        return ModelVersionInfo(
            name=name, version=str(mv.version), source=source, run_id=run_id, tags=str_tags
        )

    def latest_version(self, name: str) -> ModelVersionInfo | None:
        """Highest version of registered model ``name``, or None if it has none."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return None
        if not versions:
            return None
        mv = max(versions, key=lambda v: int(v.version))
        return self.get_version(name, str(mv.version))

    def get_version(self, name: str, version: str) -> ModelVersionInfo:
        mv = self.client.get_model_version(name, version)
        tags = dict(mv.tags or {})
        return ModelVersionInfo(
            name=name,
            version=str(mv.version),
            source=tags.get(TAG_CHECKPOINT, mv.source),
            run_id=mv.run_id,
            tags=tags,
        )

    def resolve_model(self, ref: str) -> ModelVersionInfo:
        """Resolve ``name``, ``name/version`` or ``models:/name/version`` to a registered version."""
        ref = ref.removeprefix("models:/")
        name, _, version = ref.partition("/")
        if version and version != "latest":
            return self.get_version(name, version)
        info = self.latest_version(name)
        if info is None:
            raise LookupError(f"no registered model named {name!r} in MLflow at {self.uri}")
        return info

    def recent_runs(self, experiment: str, max_results: int = 20) -> list[dict[str, Any]]:
        """The newest runs of ``experiment`` as plain dicts (params, latest metrics, tags)."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = self.client.search_runs(
            [exp.experiment_id], max_results=max_results, order_by=["attributes.start_time DESC"]
        )
        return [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "end_time": r.info.end_time,
                "params": dict(r.data.params),
                "metrics": dict(r.data.metrics),
                "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
            }
            for r in runs
        ]

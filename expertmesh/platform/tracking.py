"""MLflow tracking: runs, metrics, checkpoints as artifacts, registry versions with lineage.

Which store: :func:`expertmesh.platform.storage.tracking_uri` (a flag, ``MLFLOW_TRACKING_URI``,
the Ray cluster's, else a SQLite store under ``EXPERTMESH_HOME``). A SQLite store keeps its
artifacts in ``mlartifacts/`` beside the database file, wherever the run happens.

MLflow's own features carry the platform's bookkeeping: nested runs for multi-stage pipelines,
``log_inputs`` datasets for training data, model-version tags for lineage and model-version
aliases (``@serving``) for what a cluster serves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.platform import storage
from expertmesh.platform.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
TAG_CHECKPOINT = "expertmesh.checkpoint_uri"
SERVING_ALIAS = "serving"  # the model-version alias of what a cluster serves


# Artifact URIs only an MLflow client can read: a tracking server's proxied artifact store
# (``mlflow server --serve-artifacts``) hands out ``mlflow-artifacts:/...`` for every run.
MLFLOW_ARTIFACT_SCHEMES = ("mlflow-artifacts:", "runs:/")


def is_mlflow_artifact_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_ARTIFACT_SCHEMES)


def local_artifact_copy(uri: str) -> Path:
    """A local copy of the artifact folder ``uri``, downloaded once per node and state folder.

    The copy is keyed by the URI: a run's artifacts never change once logged. Concurrent
    callers (several shards on one node) each download to a folder of their own and the first
    rename wins, so nobody reads a half-written copy.
    """
    import hashlib
    import shutil
    import tempfile

    import mlflow

    from expertmesh import envs

    root = envs.home() / "artifact-cache"
    final = root / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(tmp), tracking_uri=default_tracking_uri()
        )
        try:
            Path(got).rename(final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_tracking_uri() -> str:
    return storage.tracking_uri()


def _artifact_root(tracking_uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite store's file; None (the server decides) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


@dataclass(kw_only=True, slots=True)
class ModelVersionInfo:
    name: str
    version: str
    source: str  # where the checkpoint's files are (a pyarrow.fs URI or local path)
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=list)


class Tracker:
    """A thin, typed wrapper over :class:`mlflow.MlflowClient` used by every pipeline."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        import mlflow

        self.uri = storage.tracking_uri(tracking_uri)
        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.run_id: str | None = None

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, before any work, when the tracking store cannot be reached.

        Raises:
            ConfigError: naming ``tracking_uri``.
        """
        try:
            if self.uri.startswith(("http://", "https://")):
                import httpx

                # NOTE: MLflow's REST client retries for minutes; one plain GET says it at once
                httpx.get(f"{self.uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
            else:
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise ConfigError(
                "tracking_uri", f"the MLflow store at {self.uri} is unreachable ({exc})"
            ) from None

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = _artifact_root(self.uri)
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
        """Start (or resume, given ``run_id``) a run; marks it FAILED if the body raises.

        A run started inside another one's ``with`` is its nested child run (MLflow's
        ``mlflow.parentRunId``), as the stages of a multi-stage pipeline.
        """
        outer = self.run_id
        if run_id is None:
            tags = dict(tags or {})
            if outer is not None:
                from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

                tags[MLFLOW_PARENT_RUN_ID] = outer
            run = self.client.create_run(
                self.experiment_id(experiment), run_name=run_name, tags=tags
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
            self.run_id = outer

    def log_dataset(
        self,
        *,
        name: str,
        digest: str,
        source: str,
        profile: Mapping[str, Any],
        context: str = "training",
    ) -> None:
        """Record the run's input data as an MLflow dataset (what ``mlflow.log_input`` logs).

        ``source`` is where the Parquet shards are; ``digest`` identifies their content.
        """
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(
            name=name,
            digest=digest[:36],  # NOTE: MLflow's digest column is short; the full one is a tag
            source_type="local" if storage.local_path_of(source) else "uri",
            source=json.dumps({"uri": source}),
            profile=json.dumps(dict(profile)),
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(self._active(), datasets=[DatasetInput(dataset=dataset, tags=tags)])

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

    def log_dict(self, value: Mapping[str, Any], artifact_file: str) -> None:
        """Write ``value`` as a JSON (or YAML, by the file's extension) artifact of the run."""
        self.client.log_dict(self._active(), dict(value), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        """Copy a folder into the run's artifacts; returns the artifact URI of that folder."""
        run_id = self._active()
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        root = self.client.get_run(run_id).info.artifact_uri
        return f"{root.rstrip('/')}/{artifact_path}"

    def register_version(
        self, name: str, *, source: str, run_id: str | None, tags: Mapping[str, Any]
    ) -> ModelVersionInfo:
        """Register ``source`` (a checkpoint) as a new version of registered model ``name``.

        An MLflow server registers no local path outside its artifact store: register a
        checkpoint on a mount with :func:`expertmesh.platform.training.register_checkpoint`.
        """
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

    @property
    def is_server(self) -> bool:
        """Whether the store is an MLflow server (rather than a database or folder)."""
        return self.uri.startswith(("http://", "https://"))

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
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, version)
        except MlflowException:
            have = [v.version for v in self.versions(name)]
            raise LookupError(
                f"registered model {name!r} has no version {version!r} in MLflow at {self.uri}"
                + (f"; its versions: {', '.join(have)}" if have else "")
            ) from None
        return _info(mv)

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of registered model ``name``, oldest first (empty if none)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return []
        out = sorted((_info(mv) for mv in found), key=lambda v: int(v.version))
        # NOTE: MLflow's search leaves model versions' aliases out; the registered model has them
        if out and not any(v.aliases for v in out):
            try:
                by_alias = dict(self.client.get_registered_model(name).aliases or {})
            except MlflowException:
                by_alias = {}
            for v in out:
                v.aliases = sorted(a for a, ver in by_alias.items() if str(ver) == v.version)
        return out

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point model-version alias ``name@alias`` (e.g. ``@serving``) at ``version``."""
        self.client.set_registered_model_alias(name, alias, version)

    def resolve_model(self, ref: str) -> ModelVersionInfo:
        """Resolve ``name``, ``name/version``, ``name@alias`` or ``models:/name/version``
        to a registered version; LookupError names what is missing."""
        from mlflow.exceptions import MlflowException

        ref = ref.removeprefix("models:/")
        if "@" in ref:
            name, _, alias = ref.partition("@")
            try:
                return _info(self.client.get_model_version_by_alias(name, alias))
            except MlflowException:
                raise LookupError(
                    f"registered model {name!r} has no alias @{alias} in MLflow at {self.uri}"
                ) from None
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


def _info(mv: Any) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=tags.get(TAG_CHECKPOINT, mv.source),
        run_id=mv.run_id,
        tags=tags,
        aliases=list(getattr(mv, "aliases", None) or []),
    )

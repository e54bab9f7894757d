"""Where results go: the MLflow tracking URI and the checkpoint root.

Both follow one precedence:

1. an explicit value (a flag, an argument);
2. the environment: ``MLFLOW_TRACKING_URI``, ``EXPERTMESH_CHECKPOINT_ROOT``;
3. what the Ray cluster this process runs on publishes (``expertmesh up`` and
   ``expertmesh.connect()`` publish them; see :mod:`expertmesh.published`);
4. the embedded default under ``EXPERTMESH_HOME`` (SQLite + a local folder), only when no
   cluster is involved.

So a pipeline submitted as a Ray job, however it was submitted, lands in the cluster's store
and never in a ``.state/`` relative to the job's unpacked working directory. A process on a
cluster that publishes nothing, with nothing explicit, gets a :class:`ConfigError` instead of
a private store nobody would find.

Ray itself is imported only when a cluster is involved: this module stays cluster-free.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from expertmesh import envs
from expertmesh.platform.errors import ConfigError

_LOOKUP: Any = object()  # sentinel: ask the cluster (if any) what it publishes


@dataclass(kw_only=True, slots=True, frozen=True)
class ClusterSettings:
    """What a Ray cluster publishes for every pipeline that runs on it."""

    tracking_uri: str
    checkpoint_root: str
    # a local path (or SQLite file) that is in fact a mount every node shares (NFS, a volume)
    shared_storage: bool = False
    # the interpreter that started the cluster: job drivers run it (`python` on their PATH)
    python: str | None = None
    job_server: str | None = None  # the Ray dashboard's URL, where jobs are submitted

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "the cluster's settings") -> ClusterSettings:
        try:
            raw = json.loads(text)
            return cls(
                tracking_uri=str(raw["tracking_uri"]),
                checkpoint_root=str(raw["checkpoint_root"]),
                shared_storage=bool(raw.get("shared_storage", False)),
                python=raw.get("python"),
                job_server=raw.get("job_server"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError("cluster_settings", f"{where} are unreadable ({exc})") from None


def on_cluster() -> bool:
    """Whether this process runs on a Ray cluster: Ray is initialised here (a driver that joined,
    an actor), or ``RAY_ADDRESS`` names one (Ray sets it for every job's driver)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    return envs.ray_address() is not None


def published_settings() -> ClusterSettings | None:
    """What the cluster this process runs on publishes; None when no cluster is involved.

    Raises:
        ConfigError: the process runs on a cluster that publishes nothing.
    """
    if not on_cluster():
        return None
    from expertmesh import cluster_kv  # NOTE: Ray lives there, not in the cluster-free core

    raw = cluster_kv.get(cluster_kv.SETTINGS_KEY)
    if raw is None:
        raise ConfigError(
            "cluster_settings",
            "this process runs on a Ray cluster that publishes no MLflow tracking URI or "
            "checkpoint root; start it with `expertmesh up` or `expertmesh.connect()` (which "
            "publish them), or set MLFLOW_TRACKING_URI and EXPERTMESH_CHECKPOINT_ROOT "
            "(--tracking-uri, --checkpoint-root)",
        )
    return ClusterSettings.from_json(raw)


def default_settings() -> ClusterSettings:
    """The embedded default: SQLite and a checkpoint folder under ``EXPERTMESH_HOME``."""
    home = envs.home()
    return ClusterSettings(
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        checkpoint_root=str(home / "checkpoints"),
        python=sys.executable,
    )


def _pick(
    explicit: str | None, env: str | None, field: str, published: ClusterSettings | Any | None
) -> str:
    if explicit:
        return explicit
    if env:
        return env
    if published is _LOOKUP:
        published = published_settings()
    if published is not None:
        return getattr(published, field)
    return getattr(default_settings(), field)


def tracking_uri(
    explicit: str | None = None, *, published: ClusterSettings | Any | None = _LOOKUP
) -> str:
    """The MLflow tracking URI: ``explicit``, ``MLFLOW_TRACKING_URI``, the cluster's, else the
    embedded SQLite store. ``published=None`` says no cluster is involved (skips the lookup)."""
    uri = _pick(explicit, envs.mlflow_tracking_uri(), "tracking_uri", published)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    return uri


def checkpoint_root(
    explicit: str | None = None, *, published: ClusterSettings | Any | None = _LOOKUP
) -> str:
    """The checkpoint root (a ``pyarrow.fs`` URI or an absolute path): ``explicit``,
    ``EXPERTMESH_CHECKPOINT_ROOT``, the cluster's, else ``<EXPERTMESH_HOME>/checkpoints``."""
    root = _pick(explicit, envs.checkpoint_root(), "checkpoint_root", published)
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(root)  # NOTE: a job's cwd is its unpacked working dir: never relative


def local_path_of(uri: str) -> str | None:
    """The node-local path ``uri`` names (a plain path, ``file://``, ``sqlite:///``), else None."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            return "/" + uri.removeprefix(prefix).lstrip("/")
    return None if "://" in uri else os.path.abspath(uri)


def check_shared(settings: ClusterSettings, *, nodes: int) -> None:
    """Refuse node-local storage on a cluster on ``nodes`` machines unless marked shared.

    A checkpoint written to one node's disk cannot be read by shards on the others, and a
    SQLite file on one node is a different store on every other node.

    Raises:
        ConfigError: naming ``checkpoint_root`` or ``tracking_uri``.
    """
    if nodes <= 1 or settings.shared_storage:
        return
    for field in ("checkpoint_root", "tracking_uri"):
        path = local_path_of(getattr(settings, field))
        if path is not None:
            raise ConfigError(
                field,
                f"{path} is a path on one machine, but this cluster's nodes run on {nodes} "
                "machines and the others cannot read it; use shared storage (s3://, gs://, an MLflow server), "
                "or, if it is a mount every node shares, set EXPERTMESH_SHARED_STORAGE=1 "
                "(shared_storage=True)",
            )


__all__ = [
    "ClusterSettings",
    "check_shared",
    "checkpoint_root",
    "default_settings",
    "local_path_of",
    "on_cluster",
    "published_settings",
    "tracking_uri",
]

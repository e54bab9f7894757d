"""Every environment variable expertmesh reads, in one place (like vLLM's ``envs.py``).

Read through the functions below, never with ``os.environ`` elsewhere, so the full set of knobs
is visible here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """``EXPERTMESH_HOME``: the state folder (data, checkpoints, MLflow store, Ray temp files).

    Defaults to ``.state`` in the current directory.
    """
    return Path(os.environ.get("EXPERTMESH_HOME", ".state")).resolve()


def ray_temp_dir() -> Path:
    """``EXPERTMESH_RAY_TMP``: Ray's session files for a local cluster (default: <home>/ray).

    Unix socket paths may not exceed 107 bytes and Ray nests ~70 under this folder, so a default
    that would be too long moves to a short folder under /tmp named after the home's hash.
    """
    explicit = os.environ.get("EXPERTMESH_RAY_TMP")
    if explicit:
        return Path(explicit).resolve()
    path = home() / "ray"
    if len(str(path)) > 36:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
        path = Path("/tmp") / f"expertmesh-ray-{digest}"
    return path


def mlflow_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI``: an MLflow server or store; unset means the embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def checkpoint_root() -> str | None:
    """``EXPERTMESH_CHECKPOINT_ROOT``: where checkpoints go (a ``pyarrow.fs`` URI or a path);
    unset means what the Ray cluster publishes, else ``<home>/checkpoints``
    (see :mod:`expertmesh.platform.storage`)."""
    return os.environ.get("EXPERTMESH_CHECKPOINT_ROOT") or None


def shared_storage() -> bool:
    """``EXPERTMESH_SHARED_STORAGE``: ``1`` says a local-path checkpoint root or SQLite store is
    a mount every node of the cluster shares (NFS, a CSI volume), so a multi-node cluster may
    use it."""
    return os.environ.get("EXPERTMESH_SHARED_STORAGE", "0") == "1"


def git_revision() -> str | None:
    """``EXPERTMESH_GIT_REVISION``: the code's git revision, recorded in lineage; set by
    ``Cluster.submit`` for jobs whose working directory travels without ``.git``."""
    return os.environ.get("EXPERTMESH_GIT_REVISION") or None


def ray_job_submission_id() -> str | None:
    """The Ray job's submission id (``raysubmit_...``) when this process is a job's driver.

    Ray's job supervisor passes the job's metadata to the driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``;
    the id is there under ``job_submission_id``.
    """
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


def ray_job_address() -> str | None:
    """``RAY_API_SERVER_ADDRESS`` (else an ``http(s)://`` ``RAY_ADDRESS``): the job server
    (Ray dashboard) that ``expertmesh submit`` talks to, as for ``ray job submit``."""
    explicit = os.environ.get("RAY_API_SERVER_ADDRESS")
    if explicit:
        return explicit
    address = os.environ.get("RAY_ADDRESS") or ""
    return address if address.startswith(("http://", "https://")) else None


def ray_address() -> str | None:
    """``RAY_ADDRESS``: an existing Ray cluster to join; unset means start a local one.

    Ray sets it for a job's driver (the cluster's GCS address). A dashboard URL (``http://``,
    meant for ``ray job submit``) is no address to join and counts as unset here.
    """
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        return None
    return address


def api_token() -> str | None:
    """``EXPERTMESH_TOKEN``: the bearer token clients send to the HTTP API."""
    return os.environ.get("EXPERTMESH_TOKEN") or None


# Settings expertmesh applies for a *local* Ray cluster only (never when joining a real one).
LOCAL_RAY_ENV: dict[str, str] = {
    # keep Ray on loopback: without it Ray picks the machine's other address and a driver
    # pointed at 127.0.0.1 can hang
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # `ray job submit` refuses to run without an explicit auth mode
    "RAY_AUTH_MODE": "disabled",
}


def apply_local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` (keeping values the user already chose)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)

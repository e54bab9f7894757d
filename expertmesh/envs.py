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


def ray_address() -> str | None:
    """``RAY_ADDRESS``: an existing Ray cluster to join; unset means start a local one."""
    return os.environ.get("RAY_ADDRESS") or None


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

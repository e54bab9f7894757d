"""Shared fixtures: an isolated state folder per session and the real prepared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Local-only settings for the test session's Ray clusters and hub-free transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray's session files stay in the project's own folder (short enough for Unix socket paths)
os.environ.setdefault("EXPERTMESH_RAY_TMP", str(REPO / ".state" / "ray"))
# ...including the files Ray's own test utilities put under its default temp folder
os.environ.setdefault("RAY_TMPDIR", str(REPO / ".state"))
(REPO / ".state" / "ray").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh EXPERTMESH_HOME (MLflow store, checkpoints, Ray temp files) for the session."""
    home = tmp_path_factory.mktemp("expertmesh-home")
    os.environ["EXPERTMESH_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


@pytest.fixture(scope="session")
def prepared_data():
    """The real three-domain data set, prepared once and reused across sessions (.state/)."""
    from expertmesh.platform.config import DataConfig
    from expertmesh.platform.data import prepare

    cfg = DataConfig(
        data_dir=str(REPO / ".state" / "test-data"), cache_dir=str(REPO / ".state" / "cache")
    )
    prepare(cfg, progress=False)
    return cfg

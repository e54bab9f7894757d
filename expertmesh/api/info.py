"""Where a running API is written down (URL, token, owning pid), so the CLI and SDK find it.

Files are written atomically (temp file + rename) and readable by their owner only: they hold
the API token.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from expertmesh import envs


@dataclass(kw_only=True, slots=True)
class ApiInfo:
    url: str
    token: str
    pid: int | None = None  # the process serving it (`expertmesh up`), when known


def api_file() -> Path:
    """Written by :func:`expertmesh.api.app.start_api` for whichever process started the API."""
    return envs.home() / "api.json"


def cluster_file() -> Path:
    """Written by `expertmesh up`; `status`, `generate`, `scale` and `down` read it."""
    return envs.home() / "cluster.json"


def write_info(path: Path, info: ApiInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    os.replace(tmp, path)


def read_info(path: Path) -> ApiInfo | None:
    try:
        data = json.loads(path.read_text())
        return ApiInfo(url=data["url"], token=data["token"], pid=data.get("pid"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_info(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def saved_token(url: str) -> str | None:
    """The token written down for the API at ``url`` (by `up` or ``start_api``), if any."""
    for path in (cluster_file(), api_file()):
        info = read_info(path)
        if info is not None and info.url.rstrip("/") == url.rstrip("/"):
            return info.token
    return None

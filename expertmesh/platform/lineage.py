"""Lineage of registered versions: what made each one, from what, on which data and code.

Every pipeline that registers a version records a :class:`Lineage` as the model version's tags
(MLflow's own place for per-version facts); the training data is also logged as an MLflow
dataset of the run. :func:`lineage_tree` turns a model's versions into a tree for
``expertmesh lineage`` and the console.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from expertmesh import envs
from expertmesh.platform.data import read_manifest

TAG_KEYS = (
    "pipeline",
    "parent",
    "trained_parts",
    "domains",
    "data_digest",
    "config_digest",
    "ray_job_id",
    "git_revision",
    "data_uri",
)


@dataclass(kw_only=True, slots=True)
class Lineage:
    pipeline: str  # train, finetune, ...
    parent: str  # "name/version" of the version it started from; "" for none
    trained_parts: str  # in --train syntax: "all", "router", "experts:1:0,..."
    domains: list[str]
    data_digest: str
    config_digest: str
    ray_job_id: str = ""  # the Ray job's submission id when it ran as a job
    git_revision: str = ""  # the code's git revision when known
    data_uri: str = ""  # where the prepared data is (finetune's default --data)

    def tags(self) -> dict[str, str]:
        out = {k: str(v) for k, v in asdict(self).items()}
        out["domains"] = ",".join(self.domains)
        return out


def digest(value: Any) -> str:
    """sha256 of ``value``'s canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data_dir: str, domains: list[str]) -> str:
    """Identifies the training data: the prepared shards' records (names, token and document
    counts, the preparing config) of ``domains`` and the tokenizer's bytes."""
    manifest = read_manifest(data_dir)
    splits = manifest.get("splits", {})
    tokenizer = Path(data_dir) / "tokenizer.json"
    return digest(
        {
            "domains": sorted(domains),
            "splits": {s: {d: v.get(d) for d in sorted(domains)} for s, v in splits.items()},
            "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
            "prepared": {k: v for k, v in manifest.items() if k != "splits"},
        }
    )


def git_revision(where: str | Path | None = None) -> str:
    """``EXPERTMESH_GIT_REVISION``, else ``git rev-parse HEAD`` of the checkout at ``where``
    (default: the one this code runs from), ``+dirty`` with uncommitted changes; "" when
    unknown (a job's working directory travels without ``.git``)."""
    if where is None and (known := envs.git_revision()):
        return known
    where = where or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{rev}+dirty" if dirty else rev


def ray_job_id() -> str:
    """The submission id of the Ray job this process is the driver of; "" otherwise."""
    return envs.ray_job_submission_id() or ""


@dataclass(kw_only=True, slots=True)
class VersionNode:
    """One registered version in a lineage tree."""

    name: str
    version: str
    parent: str  # "name/version", "" for a root
    pipeline: str
    trained_parts: str
    domains: list[str]
    aliases: list[str]
    run_id: str | None
    source: str
    tags: dict[str, str]
    children: list[VersionNode]

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "children"}
        return out | {"ref": self.ref, "children": [c.to_dict() for c in self.children]}


def lineage_tree(versions: list[Any]) -> list[VersionNode]:
    """Roots of the tree the versions form (``ModelVersionInfo``-like: name, version, tags,
    aliases, run_id, source); a version whose parent is not among them is a root."""
    nodes = {}
    for v in versions:
        tags = dict(v.tags)
        parent = tags.get("parent") or ""
        if not parent and tags.get("parent_version"):  # versions registered before `parent`
            parent = f"{v.name}/{tags['parent_version']}"
        nodes[f"{v.name}/{v.version}"] = VersionNode(
            name=v.name,
            version=str(v.version),
            parent=parent,
            pipeline=tags.get("pipeline", ""),
            trained_parts=tags.get("trained_parts", ""),
            domains=[d for d in tags.get("domains", "").split(",") if d],
            aliases=list(v.aliases),
            run_id=v.run_id,
            source=v.source,
            tags=tags,
            children=[],
        )
    roots = []
    for node in nodes.values():
        holder = nodes.get(node.parent)
        (holder.children if holder is not None else roots).append(node)
    return roots


def format_tree(roots: list[VersionNode]) -> str:
    """The tree as text, one version a line::

    expertmesh-tiny/1  train  all  [shakespeare,python]  @serving
    └── expertmesh-tiny/2  finetune  router  [legal]
    """
    lines: list[str] = []

    def walk(node: VersionNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        aliases = " ".join(f"@{a}" for a in node.aliases)
        parent = f"  (from {node.parent})" if top and node.parent else ""
        text = f"{node.ref}  {node.pipeline or '?'}  {node.trained_parts or '?'}"
        text += f"  [{','.join(node.domains)}]{parent}" + (f"  {aliases}" if aliases else "")
        lines.append(prefix + branch + text)
        below = prefix if top else prefix + ("    " if last else "│   ")
        for i, child in enumerate(node.children):
            walk(child, below, i == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)


__all__ = [
    "TAG_KEYS",
    "Lineage",
    "VersionNode",
    "data_digest",
    "digest",
    "format_tree",
    "git_revision",
    "lineage_tree",
    "ray_job_id",
]

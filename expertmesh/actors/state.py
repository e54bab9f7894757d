"""The controller's state: what it and its parts share, and the record it writes down.

:class:`ControllerState` is the one object the controller's parts (shard pool, spares,
elasticity, health) receive to read and change the deployment; :class:`LoadStats` is the load
the health part measures and elasticity follows. The record is one small JSON document written
atomically via pyarrow.fs (:class:`StateStore`); the events go to their own persisted, bounded
log beside it (:class:`~expertmesh.actors.events.EventLog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from pyarrow import fs

from expertmesh.actors.events import EventLog
from expertmesh.actors.expert_shard import ShardResources
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import placement as pl
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.placement import ExpertKey
from expertmesh.types import DEFAULT_MAX_QUEUED, RouterTuning

log = logging.getLogger(__name__)


class StateStore:
    """Reads and atomically replaces a JSON record at a pyarrow.fs URI or local path."""

    def __init__(self, uri: str) -> None:
        self.fs, self.path = fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)

    def read(self) -> dict[str, Any] | None:
        if self.fs.get_file_info(self.path).type == fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read())

    def event_log(self, session: str) -> EventLog:
        """The event log kept beside the record (``controller.json`` -> ``controller-events/``)."""
        return EventLog(self.fs, f"{self.path.rsplit('.', 1)[0]}-events", session)

    def write(self, record: dict[str, Any]) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, default=str).encode())
        self.fs.move(tmp, self.path)  # atomic rename on local file systems


@dataclass(kw_only=True, slots=True)
class DeploymentSpec:
    """What the user asked for; the reconcile loop works to keep the cluster like this."""

    model: str  # name clients use
    checkpoint_uri: str
    version: str | None = None  # the MLflow registry version, when deployed from the registry
    shards: int = 4
    min_replicas: int = 2
    shard_resources: ShardResources = field(default_factory=ShardResources)
    router_num_cpus: float = 0.25
    router: RouterTuning = field(default_factory=RouterTuning)  # threads, micro-batches, transport
    max_batch: int = 64
    max_queued: int = DEFAULT_MAX_QUEUED  # sequences that may wait for a router slot
    call_timeout_s: float = 2.0
    warm_shards: int = 1  # spare shard actors kept started for fast scale-out and healing
    max_shards: int | None = None  # most shards a scale (or the autoscaler) may ask for

    def __post_init__(self) -> None:
        if self.max_shards is not None and not self.max_shards >= max(1, self.shards):
            raise ConfigError(
                "max_shards", f"must be >= shards ({self.shards}), got {self.max_shards}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeploymentSpec:
        """The inverse of ``dataclasses.asdict`` (as the record stores it)."""
        return cls(
            **{
                **d,
                "shard_resources": ShardResources(**d["shard_resources"]),
                "router": RouterTuning(**d["router"]),
            }
        )


@dataclass(kw_only=True, slots=True)
class ModelVersion:
    """A live model version: shard calls carry ``number``; status shows ``label``."""

    number: int  # never reused within a deployment
    label: str  # "name/3" for a registry version, else the checkpoint's name
    checkpoint_uri: str
    name: str  # the registered model's name (what clients call the model)
    version: str | None = None  # the registry version, if any


def version_label(name: str, version: str | None) -> str:
    return f"{name}/{version}" if version else name


@dataclass(kw_only=True, slots=True)
class ShardRecord:
    """A shard in service (spares have none): where it runs and whether it is being drained."""

    shard_id: str
    node_id: str
    draining: bool = False


class ControllerState:
    """The deployment as the controller knows it, shared by the controller's parts.

    Every change happens under ``lock``; :meth:`save` writes the record down (call it before
    acting on a change, so that a restarted controller finds it).
    """

    def __init__(self, store: StateStore, session: str) -> None:
        """``session`` identifies the Ray cluster: a record from another session is stale."""
        self.store = store
        self.session = session
        self.lock = threading.RLock()
        self.log = store.event_log(session)
        self._tags = threading.local()  # fields added to the events of one thread (a scale's id)
        self.spec: DeploymentSpec | None = None
        self.shards: dict[str, ShardRecord] = {}  # in service
        self.handles: dict[str, ray.actor.ActorHandle] = {}  # of the shards in service
        self.spares: dict[str, ray.actor.ActorHandle] = {}  # started, holding no experts
        # the serving model version's placement; its version number counts every change of
        # what get_placement answers (other versions' tables included)
        self.table = pl.PlacementTable(version=0, replicas={})
        self.serving = 0  # number of the model version new requests start on
        self.versions: dict[int, ModelVersion] = {}  # live model versions, serving included
        self.other_tables: dict[int, pl.PlacementTable] = {}  # the others' placement
        self.next_version = 1
        self.upgrade: dict[str, Any] | None = None  # the upgrade in progress, as recorded
        self.scale: dict[str, Any] | None = None  # the scale in progress, as recorded
        self.router: ray.actor.ActorHandle | None = None
        self.next_shard = 0  # the next shard id's number: ids are never reused
        self.generation = 0  # bumped by every teardown: stale spare refills are discarded

    def event(self, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        """Record an event (persisted before this returns); returns it with its ``seq``."""
        ev = self.log.append(kind, message, {**getattr(self._tags, "fields", {}), **fields})
        log.info("%s: %s", kind, message)
        return ev

    @contextlib.contextmanager
    def tagged(self, **fields: Any) -> Iterator[None]:
        """Add ``fields`` to every event this thread records meanwhile (a scale's id on the
        shards it starts and stops, deep in the shard and spare pools)."""
        self._tags.fields = fields
        try:
            yield
        finally:
            self._tags.fields = {}

    def save(self) -> None:
        record = {
            "session": self.session,
            "spec": None if self.spec is None else asdict(self.spec),
            "shards": [asdict(s) for s in list(self.shards.values())],
            "spares": list(self.spares),
            "table": json.loads(self.table.to_json()),
            "next_shard": self.next_shard,
            "serving": self.serving,
            "versions": [asdict(v) for v in self.versions.values()],
            "other_tables": {str(n): json.loads(t.to_json()) for n, t in self.other_tables.items()},
            "next_version": self.next_version,
            "upgrade": self.upgrade,
            "scale": self.scale,
        }
        self.store.write(record)

    def restore_versions(self, record: dict[str, Any]) -> None:
        """The model versions part of a record :meth:`save` wrote."""
        self.serving = record.get("serving", 0)
        self.versions = {v["number"]: ModelVersion(**v) for v in record.get("versions", [])}
        self.other_tables = {
            int(n): pl.PlacementTable.from_json(json.dumps(t))
            for n, t in record.get("other_tables", {}).items()
        }
        self.next_version = record.get("next_version", 1)
        self.upgrade = record.get("upgrade")

    def publish(self, number: int, replicas: Mapping[ExpertKey, tuple[str, ...]]) -> None:
        """Set model version ``number``'s placement; routers see it at their next refresh."""
        if number == self.serving:
            self.table = pl.PlacementTable(version=self.table.version + 1, replicas=replicas)
            return
        self.other_tables[number] = pl.PlacementTable(version=0, replicas=replicas)
        self.bump()

    def bump(self) -> None:
        """Count a change of what get_placement answers (routers refetch)."""
        self.table = pl.PlacementTable(version=self.table.version + 1, replicas=self.table.replicas)

    def table_of(self, number: int) -> pl.PlacementTable:
        return self.table if number == self.serving else self.other_tables[number]

    def checksums_held(self) -> dict[str, set[str]]:
        """Shard id -> checksums of the expert weights it holds (for every live version)."""
        held: dict[str, set[str]] = {s: set() for s in self.shards}
        for number, mv in list(self.versions.items()):
            if number != self.serving and number not in self.other_tables:
                continue
            shas = expert_checksums(mv.checkpoint_uri)
            for key, ids in self.table_of(number).replicas.items():
                for sid in ids:
                    if sid in held:
                        held[sid].add(shas[key])
        return held

    def infos(self, include_draining: bool = False) -> list[pl.ShardInfo]:
        """The shards in service (and those being drained, if asked) for the placement policies."""
        return [
            pl.ShardInfo(shard_id=s.shard_id, node_id=s.node_id)
            for s in list(self.shards.values())
            if include_draining or not s.draining
        ]

    def require_spec(self) -> DeploymentSpec:
        """The current deployment; a part that acts on one is only called while one exists."""
        if self.spec is None:
            raise RuntimeError("nothing is deployed; deploy a model first")
        return self.spec


@dataclass(slots=True)
class LoadStats:
    """Load the health part measures (each load sample) and elasticity follows."""

    expert_ema: dict[ExpertKey, float] = field(default_factory=dict)  # tokens/s, for EPLB
    shard_busy: dict[str, float] = field(default_factory=dict)  # busy fraction, for autoscaling


def expert_checksums(checkpoint_uri: str) -> dict[ExpertKey, str]:
    """(layer, expert) -> sha256 of its weights file, from the checkpoint's manifest."""
    manifest = ckpt.read_manifest(checkpoint_uri)
    return {k: manifest.files[ckpt.expert_file(*k)].sha256 for k in manifest.expert_keys()}

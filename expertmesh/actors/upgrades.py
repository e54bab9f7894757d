"""Live upgrade for the controller: serve another registered version with no failed request.

Stages, each written to the record before it acts and announced as an event:

1. ``upgrade_started``: the target resolved and checked (same dense shape), the upgrade
   recorded (a second one is refused until it ends).
2. ``experts_loaded``: the new version's experts placed by checksum
   (:func:`expertmesh.platform.placement.place_version`): a shard that holds an expert's bytes
   for the old version serves it for the new one too; only changed or added experts are read.
3. ``router_switched``: the router built the new dense model and starts new requests on it;
   requests in flight finish on the old one. The registry alias ``@serving`` follows.
4. ``old_version_drained``: the old version's last request ended; the shards drop the weights
   that no live version uses. ``upgrade_finished`` ends it.

A failure before the switch rolls the partial state back (``upgrade_failed``); a controller
that restarts mid-upgrade finishes or rolls back from the record (:meth:`Upgrades.resume`).
Rollback is an upgrade to the parent version.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import ray

from expertmesh.actors.shard_pool import ShardPool
from expertmesh.actors.state import ControllerState, ModelVersion, expert_checksums, version_label
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import placement as pl
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.errors import ConfigError
from expertmesh.types import UpgradeInProgressError

log = logging.getLogger(__name__)

# what must match between two versions for requests of both to run side by side: the router's
# dense model and the experts' input and output rows
DENSE_SHAPE = ("d_model", "vocab_size", "n_layers", "n_heads", "n_kv_heads", "moe_every")


def check_compatible(serving: ModelConfig, target: ModelConfig, target_label: str) -> None:
    """ConfigError naming every dense-shape field in which ``target`` differs from ``serving``.

    Expert counts may differ (add_expert grows layers one expert at a time while serving)."""
    diff = [
        f"{f} {getattr(target, f)} (serving: {getattr(serving, f)})"
        for f in DENSE_SHAPE
        if getattr(serving, f) != getattr(target, f)
    ]
    if diff:
        raise ConfigError(
            "model",
            f"{target_label} has a different dense shape: {', '.join(diff)}; a live upgrade "
            "needs the same d_model, vocabulary, layers and attention heads (deploy it instead)",
        )


class Upgrades:
    """Runs one live upgrade at a time.

    Args:
        state: the controller's shared state (versions, tables, the upgrade record).
        shard_pool: applies placement plans.
        poll_s: how often the drain asks the router whether the old version still runs.
    """

    def __init__(self, state: ControllerState, shard_pool: ShardPool, *, poll_s: float = 0.05):
        self.state = state
        self.shard_pool = shard_pool
        self.poll_s = poll_s

    # ------------------------------------------------------------------ the upgrade
    def upgrade(self, ref: str) -> dict[str, Any]:
        """Serve ``ref`` (``name/version``, ``name@alias`` or a checkpoint URI) instead of the
        serving version; returns once the old version's last request ended."""
        from expertmesh.platform.loader import resolve_model

        st = self.state
        self.refuse_if_running()
        st.require_spec()
        resolved = resolve_model(ref)  # LookupError names a missing version
        version = resolved.version.version if resolved.version else None
        label = version_label(resolved.name, version)
        with st.lock:
            self.refuse_if_running()
            spec = st.require_spec()
            old = st.versions[st.serving]
            if resolved.checkpoint_uri == old.checkpoint_uri:
                raise ConfigError("model", f"{label} is the version this cluster serves already")
            serving_cfg = ckpt.read_manifest(old.checkpoint_uri).config
            target_cfg = ckpt.read_manifest(resolved.checkpoint_uri).config
            check_compatible(serving_cfg, target_cfg, label)
            new = ModelVersion(
                number=st.next_version,
                label=label,
                checkpoint_uri=resolved.checkpoint_uri,
                name=resolved.name,
                version=version,
            )
            st.next_version += 1
            st.versions[new.number] = new
            st.upgrade = {
                "from": old.number,
                "to": new.number,
                "from_label": old.label,
                "label": label,
                "stage": "loading",
                "started_at": time.time(),
            }
            st.save()  # written down before any shard loads a byte
            st.event("upgrade_started", f"{old.label} -> {label}", **self._ids())
        t0 = time.time()
        try:
            loaded = self._load(new, spec.min_replicas)
            self._switch(new)
        except Exception as exc:
            self._roll_back(new.number, exc)
            raise
        self._set_alias(new)
        drained = self._drain(old)
        return {
            "from": old.label,
            "to": label,
            "seconds": time.time() - t0,
            **loaded,
            **drained,
        }

    def refuse_if_running(self) -> None:
        """UpgradeInProgressError while an upgrade runs (for it and other pool changes)."""
        up = self.state.upgrade
        if up is not None:
            raise UpgradeInProgressError(
                f"an upgrade {up['from_label']} -> {up['label']} is in progress (stage "
                f"{up['stage']}); wait for it to finish (see the events)"
            )

    def _ids(self) -> dict[str, Any]:
        up = self.state.upgrade or {}
        return {"from_version": up.get("from_label"), "to_version": up.get("label")}

    def _load(self, new: ModelVersion, min_replicas: int) -> dict[str, Any]:
        """2) place the new version's experts by checksum; shards read only what they lack."""
        st = self.state
        with st.lock:
            shas = expert_checksums(new.checkpoint_uri)
            plan = pl.place_version(
                shas, st.infos(), st.checksums_held(), min_replicas=min_replicas
            )
            for w in plan.warnings:
                st.event("warning", w)
            # every holder maps the version's experts onto its weights (free where it holds
            # the bytes already); the plan's adds are the ones that read a file
            refs = [
                st.handles[sid].add_experts.remote(keys, new.checkpoint_uri, new.number)
                for sid, keys in plan.table.by_shard().items()
            ]
            results = ray.get(refs, timeout=120)
            st.publish(new.number, plan.table.replicas)
            st.upgrade = {**(st.upgrade or {}), "stage": "loaded"}
            st.save()
        manifest = ckpt.read_manifest(new.checkpoint_uri)
        full = sum(manifest.files[ckpt.expert_file(*k)].size for k in shas)
        out = {
            "experts": len(shas),
            "experts_changed": len({shas[m.expert] for m in plan.moves}),
            "files_loaded": sum(r["loaded"] for r in results),
            "bytes_loaded": sum(r["bytes"] for r in results),
            "expert_bytes": full,  # the new version's experts, one replica each
        }
        st.event(
            "experts_loaded",
            f"{new.label}: {out['files_loaded']} expert files read ({out['bytes_loaded']} of "
            f"{full} bytes); the other experts are shared with the serving version",
            **self._ids(),
            **out,
        )
        return out

    def _switch(self, new: ModelVersion) -> None:
        """3) the router starts new requests on ``new``; the table's serving version follows."""
        st = self.state
        if st.router is None:
            raise RuntimeError("no router to switch")
        ray.get(st.router.switch.remote(new.number, new.checkpoint_uri, new.label), timeout=120)
        with st.lock:
            spec = st.require_spec()
            old = st.serving
            st.other_tables[old] = st.table
            st.serving = new.number
            st.table = pl.PlacementTable(
                version=st.table.version + 1, replicas=st.other_tables.pop(new.number).replicas
            )
            spec.model, spec.checkpoint_uri, spec.version = (
                new.name,
                new.checkpoint_uri,
                new.version,
            )
            st.upgrade = {**(st.upgrade or {}), "stage": "switched"}
            st.save()
        st.event("router_switched", f"new requests start on {new.label}", **self._ids())

    def _set_alias(self, new: ModelVersion) -> None:
        if new.version is None:
            return
        from expertmesh.platform.tracking import SERVING_ALIAS, Tracker

        try:
            Tracker().set_alias(new.name, SERVING_ALIAS, new.version)
        except Exception as exc:  # serving is upgraded; only the registry's bookkeeping lags
            self.state.event("warning", f"could not set {new.name}@{SERVING_ALIAS}: {exc}")

    def _drain(self, old: ModelVersion) -> dict[str, Any]:
        """4) wait for the old version's last request, then drop the weights only it used."""
        st = self.state
        while st.router is not None:
            try:
                live = ray.get(st.router.versions.remote(), timeout=10)["live"]
            except Exception as exc:  # the router is gone: nothing runs on the old version
                log.warning("router unavailable while draining (%s)", exc)
                break
            if old.number not in live:
                break
            time.sleep(self.poll_s)
        with st.lock:
            st.other_tables.pop(old.number, None)
            st.versions.pop(old.number, None)
            st.bump()
            st.save()
            handles = [h for s, h in list(st.handles.items()) if s in st.shards]
        dropped = bytes_freed = 0
        for ref in [h.retire.remote(old.number) for h in handles]:
            with contextlib.suppress(Exception):  # a dead shard drops everything anyway
                r = ray.get(ref, timeout=30)
                dropped += r["dropped"]
                bytes_freed += r["bytes"]
        st.event(
            "old_version_drained",
            f"{old.label}: last request ended; dropped {dropped} expert weights only it used "
            f"({bytes_freed} bytes)",
            **self._ids(),
            dropped=dropped,
            bytes_freed=bytes_freed,
        )
        ids = self._ids()
        with st.lock:
            st.upgrade = None
            st.save()
        st.event("upgrade_finished", f"serving {ids['to_version']}", **ids)
        return {"dropped": dropped, "bytes_freed": bytes_freed}

    def _roll_back(self, number: int, exc: BaseException) -> None:
        """Undo an upgrade that failed before the switch: the new version's table and weights."""
        st = self.state
        ids = self._ids()
        with st.lock:
            st.other_tables.pop(number, None)
            st.versions.pop(number, None)
            st.bump()
            st.upgrade = None
            st.save()
            handles = list(st.handles.values())
        for h in handles:
            with contextlib.suppress(Exception):
                h.retire.remote(number)
        st.event(
            "upgrade_failed",
            f"{ids['from_version']} -> {ids['to_version']} rolled back: {type(exc).__name__}: "
            f"{exc}",
            **ids,
        )

    # ------------------------------------------------------------------ after a restart
    def resume(self) -> None:
        """Finish (or roll back) an upgrade the record says was running when the controller
        stopped: switched (by the record or by the router's word) -> drain; else roll back."""
        st = self.state
        up = st.upgrade
        if up is None:
            return
        new = st.versions.get(up["to"])
        switched = up["stage"] == "switched"
        if not switched and st.router is not None and new is not None:
            with contextlib.suppress(Exception):
                switched = ray.get(st.router.versions.remote(), timeout=10)["current"] == new.number
            if switched:  # the router switched; the record had not caught up
                with st.lock:
                    if st.serving != new.number:
                        st.other_tables[st.serving] = st.table
                        st.serving = new.number
                        st.table = pl.PlacementTable(
                            version=st.table.version + 1,
                            replicas=st.other_tables.pop(new.number).replicas,
                        )
                    st.upgrade = {**up, "stage": "switched"}
                    st.save()
        if not switched or new is None:
            self._roll_back(up["to"], RuntimeError("the controller restarted mid-upgrade"))
            return
        old = st.versions.get(up["from"])
        if old is None:
            with st.lock:
                st.upgrade = None
                st.save()
            return
        threading.Thread(target=self._drain, args=(old,), daemon=True, name="drain").start()

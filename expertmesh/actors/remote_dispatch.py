"""Ray-actor dispatcher: the serving transport behind the model's :class:`Dispatcher` interface.

Per MoE layer and step it sends one request per shard carrying all tokens for that shard's
experts, issues every request before waiting on any, and retries a dead, hung or unreachable
replica's work on another replica within the same step (per-call deadline), so a shard failure
fails no request. Requests travel over the direct channel (:mod:`expertmesh.actors.channel`,
``transport="direct"``, the default) once a shard's endpoint is known, else as Ray actor calls
(``transport="ray"`` always uses those).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from expertmesh.actors.breaker import PROBE_S, SUSPECT_S, Breakers
from expertmesh.actors.channel import (
    ChannelError,
    ChannelPool,
    ChannelTimeout,
    ConnectError,
    ShardChannel,
)
from expertmesh.platform.model import Routing, combine, permute
from expertmesh.platform.placement import ExpertKey
from expertmesh.types import TRANSPORTS, Transport

log = logging.getLogger(__name__)


class NoReplicaError(RuntimeError):
    """Every replica of an expert failed or none exists."""


@dataclass(kw_only=True, slots=True)
class PlacementView:
    """The router's cached copy of the controller's placement table.

    ``replicas`` places the experts of the serving model version (``serving``); ``others``
    those of the other live versions (the one an upgrade drains, or the one it is loading).
    """

    version: int = -1
    replicas: dict[ExpertKey, list[str]] = field(default_factory=dict)
    handles: dict[str, ray.actor.ActorHandle] = field(default_factory=dict)
    serving: int = 0
    others: dict[int, dict[ExpertKey, list[str]]] = field(default_factory=dict)

    def table(self, model_version: int) -> dict[ExpertKey, list[str]]:
        """Where the experts of ``model_version`` are; NoReplicaError if it is not live."""
        if model_version == self.serving:
            return self.replicas
        table = self.others.get(model_version)
        if table is None:
            raise NoReplicaError(
                f"model version {model_version} is not live (serving {self.serving}, "
                f"others {sorted(self.others)})"
            )
        return table


@dataclass(kw_only=True, slots=True)
class AdaptiveDeadline:
    """How long a shard call may take before its work is retried on another replica.

    ``floor_s`` while calls are fast; when the machine is starved and every call is slow, a fixed
    deadline would fire on slow-but-alive shards and retrying their work would add yet more load,
    so the deadline follows ``factor`` x the 95th percentile of recent call times (up to
    ``ceiling_s``). A truly hung shard is also fenced by the controller's heartbeats.
    """

    floor_s: float = 2.0
    factor: float = 4.0
    ceiling_s: float = 30.0
    min_samples: int = 16
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    lock: threading.Lock = field(default_factory=threading.Lock)  # micro-batches share it

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.recent.append(seconds)

    def current(self) -> float:
        with self.lock:
            ordered = sorted(self.recent)
        if len(ordered) < self.min_samples:
            return self.floor_s
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        return min(self.ceiling_s, max(self.floor_s, self.factor * p95))


@dataclass(kw_only=True, slots=True)
class DispatchStats:
    calls: int = 0
    channel_calls: int = 0  # of ``calls``, the ones sent over the direct channel
    retries: int = 0
    seconds: float = 0.0  # wall time inside dispatch(): permute, calls, waits, combine
    failed_shards: set[str] = field(default_factory=set)


Group = list[tuple[int, int, int]]  # (expert, first row, rows) of one shard's request


@dataclass(kw_only=True, slots=True)
class Round:
    """One round of shard calls for a layer: what went where, and what failed on the way."""

    by_shard: dict[str, Group]
    issued: float  # time.monotonic() when the round began
    deadline: float = 0.0
    # last replicas that had timed out: waited for up to the deadline's ceiling, until patient_until
    patient: set[str] = field(default_factory=set)
    patient_until: float = 0.0
    sent: dict[str, ShardChannel] = field(default_factory=dict)  # over the direct channel
    refs: dict[str, ray.ObjectRef] = field(default_factory=dict)  # as Ray actor calls
    failed: dict[str, str] = field(default_factory=dict)  # shard -> why

    def deadline_of(self, shard: str) -> float:
        return self.patient_until if shard in self.patient else self.deadline


@dataclass(kw_only=True, slots=True, eq=False)
class RayPending:
    """A layer's tokens sent to the shards (:meth:`RayDispatcher.submit`), answers not yet read."""

    dispatcher: RayDispatcher
    layer: int
    routing: Routing
    x_TD: torch.Tensor
    x_np: np.ndarray
    y_np: np.ndarray
    model_version: int = 0
    round: Round | None = None  # None: no tokens for this layer
    exclude: set[str] = field(default_factory=set)  # shards that failed this layer
    # of those, the ones that only timed out (slow or starved, not known dead): where no other
    # replica is left, one of them gets the work again with the deadline's ceiling
    slow: set[str] = field(default_factory=set)

    def result(self) -> torch.Tensor:
        """Wait for the answers, retry failed shards' work on other replicas, combine: (T, D)."""
        d = self.dispatcher
        t0 = time.perf_counter()
        try:
            rnd = self.round
            while rnd is not None:
                retry = d._gather(self.layer, rnd, self.y_np, self.exclude, self.slow)
                rnd = (
                    d._send(
                        self.layer, self.x_np, retry, self.exclude, self.slow, self.model_version
                    )
                    if retry
                    else None
                )
            self.round = None
            y_AD = torch.from_numpy(self.y_np).to(self.x_TD.dtype)
            return combine(y_AD, self.routing, self.x_TD.shape[0])
        finally:
            d.stats.seconds += time.perf_counter() - t0


class RayDispatcher:
    """Sends routed tokens to expert shard actors according to a :class:`PlacementView`."""

    def __init__(
        self,
        view: PlacementView,
        *,
        call_timeout_s: float = 2.0,
        transport: Transport = "direct",
        wire_dtype: str = "float32",
        suspect_s: float = SUSPECT_S,
        probe_s: float = PROBE_S,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.view = PlacementView()
        self.transport = transport
        self.deadline = AdaptiveDeadline(floor_s=call_timeout_s)  # call_timeout_s is its floor
        self.wire_dtype = np.dtype(wire_dtype)
        self.stats = DispatchStats()
        # shards whose calls failed: left out for a backoff, then probed (see breaker.py)
        self.breakers = Breakers(probe_s=probe_s, suspect_s=suspect_s)
        self.channels = ChannelPool()
        self._endpoint_refs: dict[str, ray.ObjectRef] = {}  # asked for, not yet answered
        self._endpoints_checked = 0.0
        self._rr = itertools.count()
        self.calls_by_shard: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.update(view)

    def update(self, view: PlacementView) -> None:
        with self._lock:
            if view.version != self.view.version:
                # calls so far weigh the cover's choices: a new placement starts every shard
                # level, so a shard just added is not first in line until it has caught up
                self.calls_by_shard = Counter()
            self.view = view
            self.breakers.keep(view.handles.keys())
            for shard in self.channels.known() - set(view.handles):
                self.channels.forget(shard)
            self._endpoint_refs = {
                s: r for s, r in self._endpoint_refs.items() if s in view.handles
            }
            if self.transport == "direct":
                known = self.channels.known()
                for shard, handle in view.handles.items():
                    if shard not in known and shard not in self._endpoint_refs:
                        self._endpoint_refs[shard] = handle.endpoint.remote()

    def pending_endpoints(self) -> list[ray.ObjectRef]:
        """Endpoint requests the shards have not answered yet."""
        with self._lock:
            return list(self._endpoint_refs.values())

    def collect_endpoints(self, force: bool = False) -> None:
        """Take the endpoints that shards have answered with. Never waits; unless ``force``, at
        most every 20 ms (in the step path: a hung shard's answer may never come)."""
        now = time.monotonic()
        if not force and now - self._endpoints_checked < 0.02:
            return
        self._endpoints_checked = now
        with self._lock:
            refs = dict(self._endpoint_refs)
        if not refs:
            return
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        ready_set = set(ready)
        for shard, ref in refs.items():
            if ref not in ready_set:
                continue
            with self._lock:
                self._endpoint_refs.pop(shard, None)
            try:
                self.channels.set_endpoint(shard, ray.get(ref))
            except Exception as exc:  # a dead shard: the placement drops it; Ray calls meanwhile
                log.warning("no channel endpoint from shard %s (%s)", shard, type(exc).__name__)

    def _assign(
        self,
        layer: int,
        rows: dict[int, int],
        exclude: set[str],
        slow: Set[str] = frozenset(),
        model_version: int = 0,
    ) -> dict[int, str]:
        """A shard for each expert of ``layer`` (``rows``: its tokens): few shards, rotated
        between steps, rows balanced among them. Replicas that failed this layer (``exclude``)
        are left out, unless every replica of an expert did and one of them only timed out
        (``slow``): better late than a failed request. Shards whose breaker is open (a recent
        failed call) are left out too while another replica is left; a half-open one is
        picked as usual and its call is the probe."""
        now = time.monotonic()
        avoided = self.breakers.avoided(now)
        options: dict[int, list[str]] = {}
        table = self.view.table(model_version)
        for e in rows:
            replicas = table.get((layer, e), [])
            live = [s for s in replicas if s not in exclude and s not in avoided]
            if not live:  # every replica is suspect: try the suspects before giving up
                live = [s for s in replicas if s not in exclude]
            if not live:  # every replica failed this layer: wait on a slow one, if any
                live = [s for s in replicas if s in slow]
            if not live:
                raise NoReplicaError(
                    f"no live replica of expert {(layer, e)} (replicas: {replicas})"
                )
            options[e] = live
        out = cover(options, next(self._rr), self.calls_by_shard, rows)
        self.breakers.probing(set(out.values()), now)
        return out

    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.submit(layer, x_TD, routing).result()

    def submit(
        self, layer: int, x_TD: torch.Tensor, routing: Routing, model_version: int | None = None
    ) -> RayPending:
        """Send the layer's tokens to the shards and return without waiting for the answers
        (:meth:`RayPending.result` gathers them), so the caller can compute meanwhile.
        ``model_version``: whose experts (default: the serving version's)."""
        if model_version is None:
            model_version = self.view.serving
        t0 = time.perf_counter()
        x_AD = permute(x_TD, routing).detach()
        x_np = x_AD.to(torch.float32).numpy().astype(self.wire_dtype, copy=False)
        counts = routing.counts_E.tolist()
        starts = list(itertools.accumulate([0, *counts[:-1]]))
        pending = RayPending(
            dispatcher=self,
            layer=layer,
            routing=routing,
            x_TD=x_TD,
            x_np=x_np,
            y_np=np.empty_like(x_np),
            model_version=model_version,
        )
        if self._endpoint_refs:
            self.collect_endpoints()
        items = [(e, starts[e], n) for e, n in enumerate(counts) if n]
        if items:
            pending.round = self._send(
                layer, x_np, items, pending.exclude, pending.slow, model_version
            )
        self.stats.seconds += time.perf_counter() - t0
        return pending

    def _send(
        self,
        layer: int,
        x_np: np.ndarray,
        items: Group,
        exclude: set[str],
        slow: set[str],
        model_version: int = 0,
    ) -> Round:
        """Send every shard its part of ``items``; a shard that cannot be sent to is noted as
        failed in the returned round. A shard that timed out and is sent the work again (no
        other replica left) is waited for up to the deadline's ceiling, once per layer."""
        rnd = Round(by_shard=defaultdict(list), issued=time.monotonic())
        shard_of = self._assign(layer, {e: n for e, _, n in items}, exclude, slow, model_version)
        for e, start, n in items:
            rnd.by_shard[shard_of[e]].append((e, start, n))
        rnd.patient = slow & rnd.by_shard.keys()
        slow -= rnd.patient
        rnd.deadline = rnd.issued + self.deadline.current()
        rnd.patient_until = rnd.issued + self.deadline.ceiling_s
        for shard, group in rnd.by_shard.items():
            parts = [x_np[s : s + n] for _, s, n in group]
            experts, counts = [g[0] for g in group], [g[2] for g in group]
            self.calls_by_shard[shard] += 1
            ch = None
            try:
                ch = self.channels.acquire(shard)
                if ch is not None:
                    timeout = rnd.deadline_of(shard) - time.monotonic()
                    ch.send(layer, parts, experts, counts, timeout_s=timeout, version=model_version)
                    rnd.sent[shard] = ch
                    continue
            except ConnectError as exc:
                # alive but unreachable by TCP (a firewall between nodes), or dead: a Ray call
                # tells which, now and until the endpoint is asked for again (next placement)
                self.channels.forget(shard)
                log.warning("no channel to shard %s (%s); using Ray calls for it", shard, exc)
            except ChannelError as exc:
                if ch is not None:
                    ch.close()
                rnd.failed[shard] = f"ChannelError: {exc}"
                continue
            x_part = parts[0] if len(parts) == 1 else np.concatenate(parts)
            rnd.refs[shard] = self.view.handles[shard].run.remote(
                layer, x_part, experts, counts, model_version
            )
        self.stats.calls += len(rnd.refs) + len(rnd.sent)
        self.stats.channel_calls += len(rnd.sent)
        return rnd

    def _gather(
        self, layer: int, rnd: Round, y_np: np.ndarray, exclude: set[str], slow: set[str]
    ) -> Group:
        """Wait for a round's answers (until its deadline); returns the work of shards that
        failed, to be sent again to other replicas. Shards that timed out, unless already
        waited for up to the ceiling, are added to ``slow``."""
        timed_out: set[str] = set()
        for shard, ch in rnd.sent.items():
            try:
                out = ch.receive(rnd.deadline_of(shard) - time.monotonic())
            except ChannelError as exc:
                ch.close()
                rnd.failed[shard] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ChannelTimeout):
                    timed_out.add(shard)
                continue
            self.channels.release(shard, ch)
            self._take(shard, out, rnd.by_shard[shard], y_np, rnd.issued)
        for shard, ref in rnd.refs.items():
            try:
                out = ray.get(ref, timeout=max(0.0, rnd.deadline_of(shard) - time.monotonic()))
            except (RayActorError, GetTimeoutError, RayTaskError) as exc:
                if isinstance(exc, GetTimeoutError):
                    ray.cancel(ref, force=False)
                    timed_out.add(shard)
                rnd.failed[shard] = type(exc).__name__
                continue
            self._take(shard, out, rnd.by_shard[shard], y_np, rnd.issued)
        retry: Group = []
        for shard, why in rnd.failed.items():
            slow_only = shard in timed_out
            backoff = self.breakers.failed(shard, time.monotonic(), timed_out=slow_only)
            log.warning(
                "shard %s %s layer %d (%s); its work goes to a replica, the shard gets none "
                "for %.1fs, then one probe call",
                shard,
                "timed out on" if slow_only else "failed",
                layer,
                why,
                backoff,
            )
            self.stats.failed_shards.add(shard)
            exclude.add(shard)
            if shard in timed_out and shard not in rnd.patient:
                slow.add(shard)
            retry.extend(rnd.by_shard[shard])
        if retry:
            self.stats.retries += 1
        return retry

    def _take(
        self, shard: str, out: np.ndarray, group: Group, y_np: np.ndarray, issued: float
    ) -> None:
        """Copy one shard's answer into place (its rows are its experts' slices, in order)."""
        self.deadline.observe(time.monotonic() - issued)
        if self.breakers.succeeded(shard):
            log.info("shard %s answered again; back in service", shard)
        offset = 0
        for _, s, n in group:
            y_np[s : s + n] = out[offset : offset + n]
            offset += n


class VersionDispatcher:
    """One model version's dispatcher: a :class:`RayDispatcher` (shared by every live version:
    one set of channels, breakers and deadlines) whose calls go to that version's experts.

    The router runs one engine per live version during an upgrade; each gets one of these."""

    def __init__(self, inner: RayDispatcher, model_version: int) -> None:
        self.inner = inner
        self.model_version = model_version

    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.submit(layer, x_TD, routing).result()

    def submit(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> RayPending:
        return self.inner.submit(layer, x_TD, routing, self.model_version)


def cover(
    options: dict[int, list[str]],
    turn: int,
    used: Mapping[str, int] | None = None,
    rows: Mapping[int, int] | None = None,
) -> dict[int, str]:
    """Pick one shard per expert from ``options`` (expert -> candidate shards) so that few shards
    are called: greedy set cover; ties go to the shard called least so far (``used``: calls per
    shard), then to a shard order rotated by ``turn``. A shard called less than half as often
    as the candidates' mean is starved (the greedy never picks a shard that always covers fewer
    experts than another, e.g. one added by a scale-out holding a few experts): it is picked
    first, so every replica keeps taking work. With ``rows`` (tokens per expert), the
    experts are then spread over the shards picked so that their rows are balanced: heaviest
    first, each to the least loaded picked shard that holds it.

    Every shard call costs a round trip whatever it carries, so a step that needs all 8 experts
    of a layer calls e.g. 2 shards that hold them between them instead of 4; the tie-breaks spread
    the steps (and their load) evenly over all the replicas (rotation alone gave one of two
    identical shards 3 calls in 4). The calls of a round run at once and the round waits for the
    slowest, so an expert that two picked shards hold goes to the one with fewer rows: with
    every expert on every shard (replicas=4 of 4 shards), splitting a layer's experts by rows
    instead of in two fixed halves was 1.07x the tokens/s (64 clients, A/B in one deployment).
    """
    used = used or {}
    shards = sorted({s for cands in options.values() for s in cands})
    if not shards:
        return {}
    k = turn % len(shards)
    order = {s: i for i, s in enumerate(shards[k:] + shards[:k])}
    left = set(options)
    out: dict[int, str] = {}
    mean = sum(used.get(s, 0) for s in shards) / len(shards)
    starved = [s for s in shards if used.get(s, 0) < mean / 2]
    if starved:
        first = min(starved, key=lambda s: (used.get(s, 0), order[s]))
        for e in [e for e in left if first in options[e]]:
            out[e] = first
            left.discard(e)
    while left:
        gain: dict[str, int] = defaultdict(int)
        for e in left:
            for s in options[e]:
                gain[s] += 1
        best = min(gain, key=lambda s: (-gain[s], used.get(s, 0), order[s]))
        for e in [e for e in left if best in options[e]]:
            out[e] = best
            left.discard(e)
    picked = set(out.values())
    if rows is not None and len(picked) > 1:
        load = dict.fromkeys(picked, 0)
        for e in sorted(options, key=lambda e: (-rows.get(e, 0), e)):
            best = min((s for s in options[e] if s in load), key=lambda s: (load[s], order[s]))
            out[e] = best
            load[best] += rows.get(e, 0)
    return out

"""Pure placement policies: where each expert's replicas live, and how that changes.

Every public function takes a snapshot (the current :class:`PlacementTable`, the shards, per-expert
load) and returns a decision; nothing here talks to Ray or keeps state between calls, so the
controller can call it from its reconcile loop and tests can call it with made-up numbers.

Rules every plan follows:

* Two replicas of one expert never share a shard, and they go to different nodes whenever a
  node without that expert has room (anti-affinity).
* Every expert keeps ``min_replicas`` replicas when the shards can hold them; otherwise the plan
  says so in ``warnings``. An expert never ends with zero replicas while any shard has room.
* Existing replicas stay where they are; plans add and drop the difference, and move a replica
  only to even out shard load (``max_imbalance``) or to free a slot when capacity is tight.
* ``PlacementPlan.moves`` lists every add before any drop (make-before-break): a controller that
  applies the moves in order never takes an expert below what the final table gives it.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from expertmesh.platform.errors import ExpertmeshError

ExpertKey = tuple[int, int]
"""(layer, expert) index of one expert's weights."""


class PlacementError(ExpertmeshError, ValueError):
    """A placement request cannot be met: no live shards, too little capacity or bad input."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardInfo:
    """An expert shard: an actor on ``node_id`` that holds up to ``capacity`` expert replicas."""

    shard_id: str
    node_id: str
    capacity: int | None = None  # None: unbounded

    def __post_init__(self) -> None:
        if not self.shard_id or not isinstance(self.shard_id, str):
            raise PlacementError(f"shard_id must be a non-empty string, got {self.shard_id!r}")
        if self.capacity is not None and self.capacity < 0:
            raise PlacementError(
                f"shard {self.shard_id}: capacity must be >= 0, got {self.capacity}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementTable:
    """Versioned map expert -> shard ids that hold one of its replicas."""

    version: int
    replicas: Mapping[ExpertKey, tuple[str, ...]]

    def __post_init__(self) -> None:
        clean: dict[ExpertKey, tuple[str, ...]] = {}
        for expert, shard_ids in self.replicas.items():
            ids = tuple(shard_ids)
            if len(set(ids)) != len(ids):
                raise PlacementError(f"expert {expert} lists a shard twice: {ids}")
            clean[_check_key(expert)] = ids
        object.__setattr__(self, "replicas", clean)

    def replica_count(self, expert: ExpertKey) -> int:
        return len(self.replicas.get(expert, ()))

    def total_replicas(self) -> int:
        return sum(len(ids) for ids in self.replicas.values())

    def by_shard(self) -> dict[str, list[ExpertKey]]:
        """Shard id -> experts it holds (computed in one pass; prefer it to many experts_on calls)."""
        out: dict[str, list[ExpertKey]] = {}
        for expert, ids in self.replicas.items():
            for shard_id in ids:
                out.setdefault(shard_id, []).append(expert)
        return out

    def experts_on(self, shard_id: str) -> list[ExpertKey]:
        return sorted(e for e, ids in self.replicas.items() if shard_id in ids)

    def to_json(self) -> str:
        """The controller's persisted record: ``{"version": v, "replicas": {"layer:expert": [...]}}``."""
        body = {f"{layer}:{expert}": list(ids) for (layer, expert), ids in self.replicas.items()}
        return json.dumps({"version": self.version, "replicas": body}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PlacementTable:
        try:
            record = json.loads(text)
            version, body = record["version"], record["replicas"]
        except (ValueError, TypeError, KeyError) as exc:
            raise PlacementError(f"placement record is not a valid JSON table: {exc}") from exc
        if not isinstance(body, dict):
            raise PlacementError("placement record 'replicas' must map 'layer:expert' to shard ids")
        replicas: dict[ExpertKey, tuple[str, ...]] = {}
        for key, ids in body.items():
            layer, sep, expert = key.partition(":")
            if not (sep and layer.isdigit() and expert.isdigit()):
                raise PlacementError(f"placement record key {key!r} is not 'layer:expert'")
            if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
                raise PlacementError(f"placement record {key!r}: replicas must be shard-id strings")
            replicas[(int(layer), int(expert))] = tuple(ids)
        if not isinstance(version, int):
            raise PlacementError(f"placement record version must be an int, got {version!r}")
        return cls(version=version, replicas=replicas)


@dataclass(frozen=True, kw_only=True, slots=True)
class Move:
    """Load (``add``) or unload (``drop``) one expert replica on one shard."""

    kind: Literal["add", "drop"]
    expert: ExpertKey
    shard_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementPlan:
    """A new table, the moves that lead to it (adds first), and what could not be met."""

    table: PlacementTable
    moves: tuple[Move, ...]
    warnings: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()  # shards to stop once the moves are done (scale-in)

    def adds_for(self, shard_id: str) -> list[ExpertKey]:
        """Experts ``shard_id`` must load, hottest first."""
        return [m.expert for m in self.moves if m.kind == "add" and m.shard_id == shard_id]


def update_load_ema(
    prev: Mapping[ExpertKey, float], observed: Mapping[ExpertKey, float], alpha: float
) -> dict[ExpertKey, float]:
    """Exponential moving average of per-expert load: ``alpha * observed + (1 - alpha) * prev``.

    An expert seen for the first time starts at its observed load; one absent from ``observed``
    counts as observed 0 (the router reports every expert that served tokens) and decays.
    """
    if not 0.0 < alpha <= 1.0:
        raise PlacementError(f"EMA alpha must be in (0, 1], got {alpha}")
    out = {e: (1.0 - alpha) * v for e, v in prev.items()}
    for e, v in observed.items():
        out[e] = v if e not in prev else out[e] + alpha * v
    return out


def replica_counts(
    load: Mapping[ExpertKey, float],
    *,
    num_slots: int,
    num_shards: int,
    min_replicas: int = 2,
    current: Mapping[ExpertKey, int] | None = None,
    tolerance: float = 0.0,
) -> dict[ExpertKey, int]:
    """How many replicas each expert gets, EPLB-style (DeepSeek's expert-parallel load balancer).

    Every expert first gets ``min_replicas`` (at most ``num_shards``: replicas need distinct
    shards); the remaining slots go, one at a time, to the expert with the highest load per
    replica (a heap, O(slots log experts)). With ``current``, counts start from it instead and
    one replica moves from expert ``d`` to expert ``r`` only while
    ``load[r]/c[r] > (1 + tolerance) * load[d]/(c[d]-1)``: small load changes move nothing.
    If ``num_slots`` cannot give everyone ``min_replicas``, the coldest experts keep one.
    """
    if min_replicas < 1:
        raise PlacementError(f"min_replicas must be >= 1, got {min_replicas}")
    if not load:
        return {}
    if num_shards < 1:
        raise PlacementError(f"no shards to hold the replicas of {len(load)} experts")
    if num_slots < len(load):
        raise PlacementError(
            f"{num_slots} replica slots cannot hold one replica of each of {len(load)} experts"
        )
    floor, cap = min(min_replicas, num_shards), num_shards
    cur = current or {}
    c = {e: min(cap, max(floor, cur.get(e, floor))) for e in load}
    excess = _trim(c, load, sum(c.values()) - num_slots, floor)
    excess = _trim(c, load, excess, 1)
    _fill(c, load, -excess, cap)
    if current is not None and math.isfinite(tolerance):
        _swap(c, load, tolerance, floor, cap)
    return c


def _trim(c: dict[ExpertKey, int], load: Mapping[ExpertKey, float], excess: int, lo: int) -> int:
    """Take ``excess`` replicas from experts above ``lo``, least load per remaining replica first."""
    heap = [(load[e] / (n - 1), e, n) for e, n in c.items() if n > lo]
    heapq.heapify(heap)
    while excess > 0 and heap:
        _, e, n = heapq.heappop(heap)
        c[e], excess = n - 1, excess - 1
        if n - 1 > lo:
            heapq.heappush(heap, (load[e] / (n - 2), e, n - 1))
    return excess


def _fill(c: dict[ExpertKey, int], load: Mapping[ExpertKey, float], room: int, cap: int) -> None:
    """Give ``room`` more replicas, each to the expert with the highest load per replica."""
    heap = [(-load[e] / n, e, n) for e, n in c.items() if n < cap and load[e] > 0]
    heapq.heapify(heap)
    while room > 0 and heap:
        _, e, n = heapq.heappop(heap)
        c[e], room = n + 1, room - 1
        if n + 1 < cap:
            heapq.heappush(heap, (-load[e] / (n + 1), e, n + 1))


def _swap(
    c: dict[ExpertKey, int], load: Mapping[ExpertKey, float], tol: float, floor: int, cap: int
) -> None:
    # NOTE: each swap replaces the largest changed per-replica load by two smaller ones, so the
    # sorted per-replica loads decrease lexicographically and the loop ends.
    recv = [(-load[e] / n, e, n) for e, n in c.items() if n < cap]
    donor = [(load[e] / (n - 1), e, n) for e, n in c.items() if n > floor]
    heapq.heapify(recv)
    heapq.heapify(donor)
    while True:
        while recv and c[recv[0][1]] != recv[0][2]:
            heapq.heappop(recv)
        while donor and c[donor[0][1]] != donor[0][2]:
            heapq.heappop(donor)
        if not recv or not donor or -recv[0][0] <= donor[0][0] * (1.0 + tol):
            return
        r, d = heapq.heappop(recv)[1], heapq.heappop(donor)[1]
        c[r], c[d] = c[r] + 1, c[d] - 1
        for e in (r, d):
            n = c[e]
            if n < cap:
                heapq.heappush(recv, (-load[e] / n, e, n))
            if n > floor:
                heapq.heappush(donor, (load[e] / (n - 1), e, n))


def place(
    experts: Iterable[ExpertKey],
    shards: Sequence[ShardInfo],
    *,
    load: Mapping[ExpertKey, float] | None = None,
    num_slots: int | None = None,
    min_replicas: int = 2,
    max_imbalance: float | None = 1.05,
    version: int = 1,
) -> PlacementPlan:
    """Initial placement of ``experts`` on empty ``shards``.

    Args:
        load: per-expert load (e.g. a token-count EMA); None spreads replica counts evenly.
        num_slots: total replicas to place (default ``len(experts) * min_replicas``); slots
            above the minimum become extra replicas of the hottest experts (see replica_counts
            and balanced_slots).
        max_imbalance: after the greedy pass, move or swap replicas while the busiest shard
            carries more than this × the mean shard load (None: greedy pass only).

    Example::

        plan = place([(0, e) for e in range(8)], [ShardInfo(shard_id="s0", node_id="n0"), ...])
        plan.table.replicas[(0, 3)]  # ("s0", "s5")
    """
    empty = PlacementTable(version=version - 1, replicas={_check_key(e): () for e in experts})
    unknown = set(load or ()) - empty.replicas.keys()
    if unknown:
        raise PlacementError(f"load names experts not being placed: {sorted(unknown)[:5]}")
    slots = len(empty.replicas) * min_replicas if num_slots is None else num_slots
    return _replan(
        empty, shards, load, min_replicas=min_replicas, slots=slots, polish=max_imbalance
    )


def balanced_slots(
    load: Mapping[ExpertKey, float], num_shards: int, *, min_replicas: int = 2
) -> int:
    """Fewest replica slots with which no replica carries more than the mean shard load.

    With that budget the hottest replicas each fill about one shard and the rest pack around
    them; fewer slots leave a replica heavier than a whole shard's share (that replica's shard
    sets the step time). Each expert gets ``max(min_replicas, ceil(load / mean_shard_load))``.
    """
    total = math.fsum(load.values())
    floor = min(min_replicas, num_shards)
    if total <= 0:
        return floor * len(load)
    mean = total / num_shards
    return sum(min(num_shards, max(floor, math.ceil(x / mean - 1e-9))) for x in load.values())


def slots_for_replica_balance(
    load: Mapping[ExpertKey, float],
    num_shards: int,
    *,
    max_ratio: float = 1.05,
    min_replicas: int = 2,
) -> int:
    """Fewest replica slots at which :func:`replica_counts` keeps max/mean load per replica
    within ``max_ratio`` (capacity planning: how many slots the cluster needs for that balance).

    Runs the same greedy fill as :func:`replica_counts` (one slot at a time to the expert with the
    highest load per replica) and stops at the first budget that meets the ratio, so
    ``replica_counts(load, num_slots=<result>, ...)`` gives exactly those counts. The mean falls
    as slots are added; once the hottest expert holds a replica on every shard its per-replica
    load cannot fall further, and a ratio not met by then cannot be met: PlacementError.
    """
    if max_ratio < 1.0:
        raise PlacementError(f"max_ratio must be >= 1.0, got {max_ratio}")
    if min_replicas < 1:
        raise PlacementError(f"min_replicas must be >= 1, got {min_replicas}")
    if num_shards < 1:
        raise PlacementError(f"no shards to hold the replicas of {len(load)} experts")
    total = math.fsum(load.values())
    floor = min(min_replicas, num_shards)
    slots = floor * len(load)
    if total <= 0:
        return slots
    heap = [(-x / floor, e, floor) for e, x in load.items()]
    heapq.heapify(heap)
    while True:
        top, e, n = heap[0]
        if -top * slots <= max_ratio * total:
            return slots
        if n >= num_shards:
            raise PlacementError(
                f"max/mean load per replica cannot reach {max_ratio}: expert {e} carries "
                f"{load[e] / total:.1%} of the load and already has a replica on each of the "
                f"{num_shards} shards"
            )
        heapq.heapreplace(heap, (-load[e] / (n + 1), e, n + 1))
        slots += 1


def rebalance(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    load: Mapping[ExpertKey, float],
    *,
    num_slots: int | None = None,
    min_replicas: int = 2,
    tolerance: float = 0.05,
    max_imbalance: float | None = 1.05,
) -> PlacementPlan:
    """Re-fit replica counts to new ``load``, moving as few replicas as possible.

    Counts start from the table's and change only where a replica is clearly worth more elsewhere
    (``tolerance``, see replica_counts); kept replicas stay on their shards, new ones go to the
    least-loaded shards. ``num_slots`` defaults to the table's replica total. Experts in ``load``
    but not in the table (a newly added expert) are placed; replicas on shards not in ``shards``
    are dropped.
    """
    slots = table.total_replicas() if num_slots is None else num_slots
    return _replan(
        table,
        shards,
        load,
        min_replicas=min_replicas,
        slots=slots,
        tolerance=tolerance,
        polish=max_imbalance,
    )


def heal(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    dead: Collection[str],
    *,
    load: Mapping[ExpertKey, float] | None = None,
    min_replicas: int = 2,
) -> PlacementPlan:
    """Drop the replicas on ``dead`` shards and restore ``min_replicas`` on live ones.

    Hottest experts are placed first; an expert with no live replica always gets one if any live
    shard has room. Replicas on live shards stay put unless live capacity is short (extra
    replicas of cold experts then make room) or fragmented (one replica then moves to free a
    slot). Drops of dead shards' replicas are bookkeeping (the actor is gone). Lost extra
    replicas of hot experts are not re-created here; a later :func:`rebalance` does that.
    """
    gone = set(dead)
    live = [s for s in shards if s.shard_id not in gone]
    return _replan(table, live, load, min_replicas=min_replicas, slots=None)


def scale_out(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    new_shards: Sequence[ShardInfo],
    load: Mapping[ExpertKey, float],
    *,
    num_slots: int | None = None,
    min_replicas: int = 2,
) -> PlacementPlan:
    """Give new (empty) shards extra replicas of the hottest experts.

    ``num_slots`` defaults to the table's total plus, per new shard, its capacity (or the current
    mean replicas per shard when the capacity is unbounded). ``plan.adds_for(shard_id)`` lists
    what each new shard loads, hottest first.
    """
    if num_slots is None:
        per_shard = table.total_replicas() / max(1, len(shards))
        extra = sum(round(per_shard) if s.capacity is None else s.capacity for s in new_shards)
        num_slots = table.total_replicas() + extra
    return rebalance(
        table, [*shards, *new_shards], load, num_slots=num_slots, min_replicas=min_replicas
    )


def place_version(
    experts: Mapping[ExpertKey, str],
    shards: Sequence[ShardInfo],
    held: Mapping[str, Collection[str]],
    *,
    min_replicas: int = 2,
    version: int = 1,
) -> PlacementPlan:
    """Place another model version's experts on shards that already hold some of them (upgrade).

    An expert is identified by its checkpoint file's checksum (``experts``: (layer, expert) ->
    sha256), so an expert a version shares with a live one is served by every shard that already
    holds those bytes, and loads nowhere. An expert with fewer than ``min_replicas`` holders
    (a retrained or added expert) gets new replicas on other shards: on nodes that hold no
    replica of it first, then on the shards with the fewest replicas in the new table. The plan
    only adds (the old version's experts go once its last request ends).

    Args:
        experts: the new version's (layer, expert) -> checksum of its weights.
        shards: the shards in service.
        held: shard id -> checksums it holds now (for any live version).
        min_replicas: replicas every expert of the new version gets (at most one per shard).
        version: the version number of the returned table.

    Example::

        plan = place_version({(0, 0): "ab..", (0, 1): "cd.."}, shards, {"s0": {"ab.."}})
        plan.adds_for("s1")  # [(0, 0), (0, 1)]: s0 already holds (0, 0)'s bytes
    """
    if min_replicas < 1:
        raise PlacementError(f"min_replicas must be >= 1, got {min_replicas}")
    if not shards:
        raise PlacementError(f"no live shards to hold the {len(experts)} experts")
    ids = [s.shard_id for s in shards]
    unknown = sorted(set(held) - set(ids))
    if unknown:
        raise PlacementError(f"held names shards not in service: {unknown[:5]}")
    node_of = {s.shard_id: s.node_id for s in shards}
    holders = {
        _check_key(k): [s for s in ids if sha in held.get(s, ())] for k, sha in experts.items()
    }
    per_shard = Counter(s for v in holders.values() for s in v)  # replicas in the new table
    floor = min(min_replicas, len(ids))
    moves: list[Move] = []
    # experts with the fewest holders first: new experts take the emptiest shards
    for key in sorted(holders, key=lambda k: (len(holders[k]), k)):
        have = holders[key]
        while len(have) < floor:
            nodes = {node_of[s] for s in have}
            best = min(
                (s for s in ids if s not in have),
                key=lambda s: (node_of[s] in nodes, per_shard[s], ids.index(s)),
            )
            have.append(best)
            per_shard[best] += 1
            moves.append(Move(kind="add", expert=key, shard_id=best))
    warnings = ()
    if floor < min_replicas:
        warnings = (f"{len(ids)} shards cannot hold {min_replicas} replicas of each expert",)
    table = PlacementTable(version=version, replicas={k: tuple(v) for k, v in holders.items()})
    return PlacementPlan(table=table, moves=tuple(moves), warnings=warnings)


def scale_in(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    load: Mapping[ExpertKey, float] | None = None,
    *,
    count: int | None = None,
    shard_ids: Collection[str] | None = None,
    min_replicas: int = 2,
) -> PlacementPlan:
    """Drain ``count`` shards (chosen by :func:`pick_shards_to_drain`) or the given ``shard_ids``.

    Every expert that would fall below ``min_replicas`` (or lose its last replica) first gets a
    replica on a remaining shard; only then do the drained shards' replicas drop. ``plan.drain``
    names the shards to stop after the moves. Extra replicas of hot experts on drained shards
    are not re-created; a later :func:`rebalance` does that.
    """
    if (count is None) == (shard_ids is None):
        raise PlacementError("scale_in needs exactly one of count= or shard_ids=")
    if shard_ids is None:
        drain = pick_shards_to_drain(table, shards, load, count or 0, min_replicas=min_replicas)
    else:
        drain = tuple(shard_ids)
    unknown = set(drain) - {s.shard_id for s in shards}
    if unknown:
        raise PlacementError(f"cannot drain unknown shards {sorted(unknown)}")
    keep = [s for s in shards if s.shard_id not in set(drain)]
    plan = _replan(table, keep, load, min_replicas=min_replicas, slots=None)
    return PlacementPlan(table=plan.table, moves=plan.moves, warnings=plan.warnings, drain=drain)


def pick_shards_to_drain(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    load: Mapping[ExpertKey, float] | None,
    count: int,
    *,
    min_replicas: int = 2,
) -> tuple[str, ...]:
    """Choose ``count`` shards to drain: fewest replicas that would need a new home, then least load.

    A replica needs a new home when its expert would drop below ``min_replicas`` without it.
    """
    if not 0 <= count < len(shards):
        raise PlacementError(f"can drain 0..{len(shards) - 1} of {len(shards)} shards, not {count}")
    loads = _loads(load, table.replicas)
    held = table.by_shard()
    left = {e: len(ids) for e, ids in table.replicas.items()}
    share = {e: loads[e] / max(1, n) for e, n in left.items()}

    def score(sid: str) -> tuple[int, float]:
        mine = held.get(sid, [])
        return sum(left[e] <= min_replicas for e in mine), sum(share[e] for e in mine)

    # NOTE: scores only grow as other shards are drained, so a popped entry whose score is
    # still current is the true minimum (lazy re-scoring).
    heap = [(score(s.shard_id), i, s.shard_id) for i, s in enumerate(shards)]
    heapq.heapify(heap)
    chosen: list[str] = []
    while len(chosen) < count:
        old, i, sid = heapq.heappop(heap)
        new = score(sid)
        if new != old:
            heapq.heappush(heap, (new, i, sid))
            continue
        chosen.append(sid)
        for e in held.get(sid, []):
            left[e] -= 1
    return tuple(chosen)


def balance_ratios(
    table: PlacementTable, load: Mapping[ExpertKey, float], shard_ids: Iterable[str] = ()
) -> tuple[float, float]:
    """``(max/mean load per replica, max/mean load per shard)``, each expert's load split evenly
    over its replicas. Shards in ``shard_ids`` that hold nothing count as load 0."""
    per_replica: list[float] = []
    per_shard = dict.fromkeys(shard_ids, 0.0)
    for e, ids in table.replicas.items():
        share = load.get(e, 0.0) / len(ids) if ids else 0.0
        per_replica.extend([share] * len(ids))
        for sid in ids:
            per_shard[sid] = per_shard.get(sid, 0.0) + share
    return _max_over_mean(per_replica), _max_over_mean(list(per_shard.values()))


def _max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def _check_key(expert: Any) -> ExpertKey:
    if not (
        isinstance(expert, tuple)
        and len(expert) == 2
        and all(isinstance(i, int) and i >= 0 for i in expert)
    ):
        raise PlacementError(
            f"expert key must be (layer, expert) non-negative ints, got {expert!r}"
        )
    return expert


def _loads(load: Mapping[ExpertKey, float] | None, experts: Iterable[ExpertKey]) -> dict:
    if load is None:
        return dict.fromkeys(experts, 1.0)
    out = {e: 0.0 for e in experts} | {_check_key(e): float(v) for e, v in load.items()}
    bad = [e for e, v in out.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise PlacementError(f"load must be finite and >= 0; bad for {bad[:5]}")
    return out


def _replan(
    table: PlacementTable,
    shards: Sequence[ShardInfo],
    load: Mapping[ExpertKey, float] | None,
    *,
    min_replicas: int,
    slots: int | None,
    tolerance: float = math.inf,
    polish: float | None = None,
) -> PlacementPlan:
    """Fit ``table`` onto ``shards``; the plan's moves are the difference, adds hottest first.

    ``slots=None`` restores every expert to its floor and adds nothing else (heal, scale-in);
    ``polish`` migrates replicas off shards above ``polish`` × mean shard load.
    """
    ids = [s.shard_id for s in shards]
    if not shards:
        raise PlacementError(f"no live shards to hold the {len(table.replicas)} experts")
    if len(set(ids)) != len(ids):
        raise PlacementError(
            f"duplicate shard ids: {sorted(k for k, n in Counter(ids).items() if n > 1)}"
        )
    loads = _loads(load, table.replicas)
    live = set(ids)
    kept = {e: [s for s in table.replicas.get(e, ()) if s in live] for e in loads}
    capacity = math.fsum(math.inf if s.capacity is None else s.capacity for s in shards)
    if capacity < len(loads):
        raise PlacementError(
            f"{len(shards)} shards hold at most {int(capacity)} replicas in total, fewer than the "
            f"{len(loads)} experts that need one each; add shards or raise their capacity"
        )
    if slots is None:
        floor = min(min_replicas, len(shards))
        slots = sum(max(len(v), floor) for v in kept.values())
    counts = replica_counts(
        loads,
        num_slots=int(min(slots, capacity)),
        num_shards=len(shards),
        min_replicas=min_replicas,
        current={e: len(v) for e, v in kept.items()} if table.total_replicas() else None,
        tolerance=tolerance,
    )
    fleet = _Fleet(shards, kept, {e: loads[e] / n for e, n in counts.items()})
    fleet.drop_extras(counts)
    short = fleet.add_missing(counts, loads)
    if polish is not None:
        fleet.polish(polish)
    replicas = {e: tuple(v) for e, v in kept.items()}
    old = table.replicas
    adds = [(e, s) for e, v in replicas.items() for s in v if s not in old.get(e, ())]
    adds.sort(key=lambda m: (-loads[m[0]], m))  # hottest experts load first
    moves = [Move(kind="add", expert=e, shard_id=s) for e, s in adds]
    moves += [
        Move(kind="drop", expert=e, shard_id=s)
        for e, v in old.items()
        for s in v
        if s not in replicas.get(e, ())
    ]
    changed = bool(moves) or replicas.keys() != old.keys()
    return PlacementPlan(
        table=PlacementTable(version=table.version + int(changed), replicas=replicas),
        moves=tuple(moves),
        warnings=fleet.warnings(min_replicas, short),
    )


class _Fleet:
    """Mutable per-shard bookkeeping for one planning call: load, replica count, who holds what."""

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        kept: dict[ExpertKey, list[str]],
        weight: dict[ExpertKey, float],
    ) -> None:
        self.shards, self.kept, self.weight = shards, kept, weight
        self.index = {s.shard_id: i for i, s in enumerate(shards)}
        self.node = [s.node_id for s in shards]
        self.cap = [math.inf if s.capacity is None else s.capacity for s in shards]
        self.load = [0.0] * len(shards)
        self.on: list[set[ExpertKey]] = [set() for _ in shards]
        self.nodes_of: dict[ExpertKey, Counter[str]] = {e: Counter() for e in kept}
        for e, held in kept.items():
            for sid in held:
                i = self.index[sid]
                self.load[i] += weight[e]
                self.on[i].add(e)
                self.nodes_of[e][self.node[i]] += 1
        # NOTE: ties on load break by slot-within-node, then node, so empty shards fill
        # node-round-robin and anti-affinity searches rarely skip a shard.
        order = {n: k for k, n in enumerate(dict.fromkeys(self.node))}
        seen: Counter[str] = Counter()
        self.rank = []
        for n in self.node:
            self.rank.append(seen[n] * len(shards) + order[n])
            seen[n] += 1

    def _move(self, e: ExpertKey, i: int, add: bool) -> None:
        sid, sign = self.shards[i].shard_id, 1.0 if add else -1.0
        self.load[i] += sign * self.weight[e]
        self.nodes_of[e][self.node[i]] += int(sign)
        (self.on[i].add if add else self.on[i].discard)(e)
        (self.kept[e].append if add else self.kept[e].remove)(sid)

    def _free(self, i: int) -> bool:
        return len(self.on[i]) < self.cap[i]

    def drop_extras(self, counts: Mapping[ExpertKey, int]) -> None:
        """Drop replicas above ``counts``: from shared nodes first, then from full shards that
        lack an expert still short of replicas (the freed slot is then of use), then the most
        loaded shards."""
        needy = [e for e, n in counts.items() if n > len(self.kept[e])]

        def key(s: str) -> tuple[int, bool, float]:
            i = self.index[s]
            useful = not self._free(i) and any(f not in self.on[i] for f in needy)
            return per_node[self.node[i]], useful, self.load[i]

        for e, held in self.kept.items():
            while len(held) > counts[e]:
                per_node = Counter(self.node[self.index[s]] for s in held)
                self._move(e, self.index[max(held, key=key)], add=False)

    def add_missing(
        self, counts: Mapping[ExpertKey, int], load: Mapping[ExpertKey, float]
    ) -> list[ExpertKey]:
        """LPT greedy: largest load per replica first, each replica to the least-loaded shard with
        room that lacks the expert, preferring nodes that lack it. Returns experts left short."""
        heap = [(self.load[i], self.rank[i], i) for i in range(len(self.shards)) if self._free(i)]
        heapq.heapify(heap)
        short = []
        todo = [e for e in counts if counts[e] > len(self.kept[e])]
        for e in sorted(todo, key=lambda e: (-self.weight[e], -load[e], e)):
            nodes = self.nodes_of[e]
            skipped, placed = [], []
            for _ in range(counts[e] - len(self.kept[e])):
                pick = None
                while heap and pick is None:
                    item = heapq.heappop(heap)
                    i = item[2]
                    if not self._free(i):
                        continue
                    if item[0] != self.load[i]:  # stale after _make_room
                        heapq.heappush(heap, (self.load[i], self.rank[i], i))
                    elif e in self.on[i] or nodes[self.node[i]]:
                        skipped.append(item)
                    else:
                        pick = i
                if pick is None:  # every shard with room shares a node with a replica
                    k = next((k for k, it in enumerate(skipped) if e not in self.on[it[2]]), None)
                    pick = skipped.pop(k)[2] if k is not None else self._make_room(e)
                if pick is None:
                    short.append(e)
                    break
                self._move(e, pick, add=True)
                placed.append(pick)
            for item in skipped:
                heapq.heappush(heap, item)
            for i in placed:
                if self._free(i):
                    heapq.heappush(heap, (self.load[i], self.rank[i], i))
        return short

    def _make_room(self, e: ExpertKey) -> int | None:
        """Every shard with room already holds ``e``: move some replica ``f`` from a full shard
        without ``e`` to a shard with room without ``f``, and return the freed shard."""
        free = [i for i in range(len(self.shards)) if self._free(i)]
        for t in sorted(range(len(self.shards)), key=lambda i: (self.load[i], self.rank[i])):
            if e in self.on[t] or self._free(t):
                continue
            for f in sorted(self.on[t], key=lambda f: (self.weight[f], f)):
                u = next((u for u in free if f not in self.on[u]), None)
                if u is not None:
                    self._move(f, u, add=True)
                    self._move(f, t, add=False)
                    return t
        return None

    def polish(self, max_ratio: float, width: int = 16) -> None:
        """Local search: while the most loaded shard is above ``max_ratio`` × mean, move one of its
        replicas to, or swap it with a lighter replica of, one of the ``width`` least-loaded
        shards, picking the change that lowers the peak most; stop when none lowers it. No move
        puts more copies of an expert on one node than its source node had."""
        mean = sum(self.load) / len(self.load)
        hot = [(-x, i) for i, x in enumerate(self.load)]
        cool = [(x, self.rank[i], i) for i, x in enumerate(self.load)]
        heapq.heapify(hot)
        heapq.heapify(cool)
        limit = max_ratio * mean * (1 + 1e-9)
        for _ in range(4 * len(self.load) if mean > 0 else 0):  # NOTE: a time cap; it ends sooner
            while -hot[0][0] != self.load[hot[0][1]]:
                heapq.heappop(hot)  # stale: a fresh entry was pushed when the shard changed
            h = hot[0][1]
            if self.load[h] <= limit:
                return
            best = None
            for t in self._coolest(cool, width):
                if self.load[t] >= self.load[h] or (best is not None and best[0][0] <= limit):
                    break  # NOTE: a change that ends within the limit is good enough: take it
                for a in self.on[h]:
                    if not self._fits(a, t, h):
                        continue
                    options = [(None, 0.0)] if self._free(t) else []
                    options += [
                        (b, self.weight[b])
                        for b in self.on[t]
                        if self.weight[b] < self.weight[a] and self._fits(b, h, t)
                    ]
                    for b, wb in options:
                        d = self.weight[a] - wb
                        peak = (max(self.load[h] - d, self.load[t] + d), b is not None)
                        if peak[0] < self.load[h] * (1 - 1e-9) and (best is None or peak < best[0]):
                            best = (peak, a, b, t)
            if best is None:
                return  # no single move or swap makes the hottest shard cooler
            _, a, b, t = best
            self._move(a, t, add=True)
            self._move(a, h, add=False)
            if b is not None:
                self._move(b, h, add=True)
                self._move(b, t, add=False)
            for i in (h, t):
                heapq.heappush(hot, (-self.load[i], i))
                heapq.heappush(cool, (self.load[i], self.rank[i], i))

    def _coolest(self, cool: list[tuple[float, int, int]], width: int) -> list[int]:
        """The ``width`` least-loaded shards, dropping stale heap entries on the way."""
        found: list[tuple[float, int, int]] = []
        while cool and len(found) < width:
            item = heapq.heappop(cool)
            if item[0] == self.load[item[2]] and item not in found:
                found.append(item)
        for item in found:
            heapq.heappush(cool, item)
        return [item[2] for item in found]

    def _fits(self, e: ExpertKey, dst: int, src: int) -> bool:
        """Can ``e``'s replica on ``src`` move to ``dst`` without sharing a node more than now?"""
        copies = self.nodes_of[e]
        at_dst = copies[self.node[dst]] - (self.node[dst] == self.node[src])
        return e not in self.on[dst] and at_dst + 1 <= copies[self.node[src]]

    def warnings(self, min_replicas: int, short: list[ExpertKey]) -> tuple[str, ...]:
        out = []
        under = sorted(e for e, held in self.kept.items() if len(held) < min_replicas)
        if under:
            out.append(
                f"{len(under)} experts have fewer than min_replicas={min_replicas} replicas "
                f"(e.g. {under[:3]}): {len(self.shards)} shards, capacity or slot budget too small"
            )
        n_nodes = len(set(self.node))
        shared = sorted(
            e
            for e, held in self.kept.items()
            if len({self.node[self.index[s]] for s in held}) < min(len(held), n_nodes)
        )
        if shared:
            out.append(f"{len(shared)} experts have two replicas on one node (e.g. {shared[:3]})")
        if short:
            out.append(
                f"no shard had room for every replica of {len(short)} experts (e.g. {short[:3]})"
            )
        return tuple(out)

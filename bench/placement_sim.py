"""Placement at cluster scale: EPLB replication + load-balanced assignment vs a naive baseline.

Simulates ``--nodes`` nodes × ``--shards-per-node`` shards serving ``--experts`` experts (64 per
MoE layer) with Zipf-skewed load and ``min_replicas`` 2. ``--load per-layer`` (the default) is
what a model does: every layer sees every token, so each layer carries the same total load,
Zipf-skewed over its 64 experts; ``--load global`` ranks all experts in one Zipf (one expert of
4096 then carries 11 % of all traffic, more than any real layer hands one expert).

Two ratios are printed for each placement (1.0 is perfect):

* replica max/mean: max over replicas / mean over replicas of load per replica, where each
  expert's load is split evenly over its replicas. With a ``min_replicas`` floor and skewed load
  this cannot reach 1: cold experts' forced replicas pull the mean down.
* shard max/mean: max over shards / mean over shards of the summed load of the replicas a shard
  holds. This is what sets a serving step's latency (the slowest shard).

Each run places with three replica budgets, each next to the round-robin baseline on the same
budget: a fixed one (``--slots-per-expert`` × experts), ``balanced_slots`` (the fewest slots at
which no replica carries more than a mean shard's load) and ``slots_for_replica_balance`` (the
fewest slots at which max/mean load per replica is ≤ ``--replica-ratio``); then it shifts the load
and rebalances.

Run: ``python bench/placement_sim.py`` (add ``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from machine import machine_line  # bench/ is on sys.path (the script's folder)

from expertmesh.platform.placement import (
    ExpertKey,
    PlacementError,
    PlacementTable,
    ShardInfo,
    balance_ratios,
    balanced_slots,
    place,
    rebalance,
    slots_for_replica_balance,
)


@dataclass(kw_only=True, slots=True)
class SimConfig:
    nodes: int = 1024
    shards_per_node: int = 4
    experts: int = 4096  # spread over layers of 64 experts each
    slots_per_expert: float = 2.5
    shard_capacity: int | None = 16  # replicas per shard; 0 on the command line: unbounded
    zipf: float = 1.0
    load: str = "per-layer"  # or "global"
    replica_ratio: float = 1.05
    shift_fraction: float = 0.05
    min_replicas: int = 2
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class Row:
    """One placement of one slot budget: how long it took and how balanced it is."""

    method: str
    slots: int
    seconds: float
    ratios: tuple[float, float]  # (replica max/mean, shard max/mean)


def zipf_load(cfg: SimConfig, rng: np.random.Generator) -> dict[ExpertKey, float]:
    """Per-expert load ∝ 1/rank^zipf: ranks shuffled within each layer of 64 experts, every layer
    the same total (``per-layer``), or one ranking shuffled over all (layer, expert) keys."""
    if cfg.load == "global":
        load_E = 1.0 / np.arange(1, cfg.experts + 1) ** cfg.zipf
        rng.shuffle(load_E)
    elif cfg.load == "per-layer":
        layer = 1.0 / np.arange(1, 65) ** cfg.zipf
        load_E = np.concatenate([rng.permutation(layer) for _ in range(-(-cfg.experts // 64))])
        load_E = load_E[: cfg.experts]
    else:
        raise SystemExit(f"--load must be per-layer or global, got {cfg.load!r}")
    return {(i // 64, i % 64): float(x) for i, x in enumerate(load_E)}


def shard_list(cfg: SimConfig) -> list[ShardInfo]:
    return [
        ShardInfo(shard_id=f"n{n}-s{k}", node_id=f"n{n}", capacity=cfg.shard_capacity)
        for n in range(cfg.nodes)
        for k in range(cfg.shards_per_node)
    ]


def naive_table(experts: list[ExpertKey], shards: list[ShardInfo], slots: int) -> PlacementTable:
    """Round-robin baseline: load-blind, the same replica count for all (remainder to the first),
    consecutive replicas on consecutive shards of a node-interleaved shard order."""
    base, extra = divmod(slots, len(experts))
    by_node: dict[str, list[str]] = {}
    for s in shards:
        by_node.setdefault(s.node_id, []).append(s.shard_id)
    order = [
        ids[k]
        for k in range(max(map(len, by_node.values())))
        for ids in by_node.values()
        if k < len(ids)
    ]
    replicas, pos = {}, 0
    for i, e in enumerate(experts):
        n = base + (i < extra)
        replicas[e] = tuple(order[(pos + j) % len(order)] for j in range(n))
        pos += n
    return PlacementTable(version=1, replicas=replicas)


def shift_load(
    load: dict[ExpertKey, float], fraction: float, rng: np.random.Generator
) -> dict[ExpertKey, float]:
    """Shuffle the loads of a random ``fraction`` of experts among themselves."""
    keys = list(load)
    picked = rng.choice(len(keys), size=max(2, int(fraction * len(keys))), replace=False)
    values = [load[keys[i]] for i in picked]
    rng.shuffle(values)
    out = dict(load)
    for i, v in zip(picked, values, strict=True):
        out[keys[i]] = v
    return out


def diff_size(a: PlacementTable, b: PlacementTable) -> int:
    """Replica adds + drops that turn table ``a`` into table ``b``."""
    return sum(len(set(a.replicas[e]) ^ set(b.replicas.get(e, ()))) for e in a.replicas)


def measure(
    cfg: SimConfig, load: dict[ExpertKey, float], shards: list[ShardInfo], slots: int
) -> tuple[list[Row], PlacementTable]:
    """Place with EPLB + LPT and with round robin, same budget; time and score both."""
    ids = [s.shard_id for s in shards]
    t0 = time.perf_counter()
    plan = place(list(load), shards, load=load, num_slots=slots, min_replicas=cfg.min_replicas)
    t1 = time.perf_counter()
    naive = naive_table(list(load), shards, slots)
    t2 = time.perf_counter()
    rows = [
        Row(method=method, slots=slots, seconds=seconds, ratios=balance_ratios(table, load, ids))
        for method, seconds, table in (
            ("eplb+lpt", t1 - t0, plan.table),
            ("round-robin", t2 - t1, naive),
        )
    ]
    return rows, plan.table


def main() -> None:
    print(machine_line())
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    defaults = SimConfig()
    for name in SimConfig.__slots__:
        default = getattr(defaults, name)
        kind = type(default) if isinstance(default, (float, str)) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    cfg = SimConfig(**vars(parser.parse_args()))
    if cfg.shard_capacity == 0:
        cfg.shard_capacity = None
    rng = np.random.default_rng(cfg.seed)
    load = zipf_load(cfg, rng)
    shards = shard_list(cfg)
    ids = [s.shard_id for s in shards]
    budgets = {
        f"{cfg.slots_per_expert:.2f}×E": int(cfg.slots_per_expert * cfg.experts),
        "balanced": balanced_slots(load, len(shards), min_replicas=cfg.min_replicas),
    }
    print(
        f"{cfg.nodes} nodes × {cfg.shards_per_node} shards (capacity {cfg.shard_capacity}), "
        f"{cfg.experts} experts, Zipf s={cfg.zipf} ({cfg.load}), min_replicas={cfg.min_replicas}"
    )
    try:
        budgets[f"replica≤{cfg.replica_ratio}"] = slots_for_replica_balance(
            load, len(shards), max_ratio=cfg.replica_ratio, min_replicas=cfg.min_replicas
        )
    except PlacementError as err:
        print(f"no budget reaches replica max/mean ≤ {cfg.replica_ratio}: {err}")
    capacity = cfg.shard_capacity and cfg.shard_capacity * len(shards)
    for label, slots in list(budgets.items()):
        if capacity and slots > capacity:
            print(f"skipping {label}: {slots} slots exceed the shards' capacity {capacity}")
            del budgets[label]
    print(
        f"{'slots':>18} {'method':>12} {'seconds':>8} {'replica max/mean':>17} {'shard max/mean':>15}"
    )
    for label, slots in budgets.items():
        rows, table = measure(cfg, load, shards, slots)
        for k, row in enumerate(rows):
            budget = f"{label} {slots}" if k == 0 else ""
            print(
                f"{budget:>18} {row.method:>12} {row.seconds:8.3f} "
                f"{row.ratios[0]:17.3f} {row.ratios[1]:15.3f}"
            )

    shifted = shift_load(load, cfg.shift_fraction, rng)
    t0 = time.perf_counter()
    moved = rebalance(table, shards, shifted, min_replicas=cfg.min_replicas)
    seconds = time.perf_counter() - t0
    fresh = place(list(load), shards, load=shifted, num_slots=slots, min_replicas=cfg.min_replicas)
    total = table.total_replicas()
    print(
        f"load shift on {cfg.shift_fraction:.0%} of experts ({label} budget): rebalance "
        f"{len(moved.moves)} moves = {len(moved.moves) / total:.2%} of {total} replicas in "
        f"{seconds:.3f} s, shard max/mean {balance_ratios(moved.table, shifted, ids)[1]:.3f}; "
        f"placing from scratch: {diff_size(table, fresh.table)} moves, shard max/mean "
        f"{balance_ratios(fresh.table, shifted, ids)[1]:.3f}"
    )


if __name__ == "__main__":
    main()

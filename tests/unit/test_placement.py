"""Placement, replication, rebalance, heal, scale-in/out and autoscaling policies: no cluster."""

from __future__ import annotations

import json
import random

import pytest

from expertmesh.platform.autoscale import (
    AutoscaleConfig,
    AutoscaleState,
    LoadSnapshot,
    autoscale,
    required_shards,
)
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.placement import (
    ExpertKey,
    PlacementError,
    PlacementPlan,
    PlacementTable,
    ShardInfo,
    balance_ratios,
    balanced_slots,
    heal,
    place,
    rebalance,
    replica_counts,
    scale_in,
    scale_out,
    slots_for_replica_balance,
    update_load_ema,
)


def make_shards(nodes: int, per_node: int, capacity: int | None = None) -> list[ShardInfo]:
    return [
        ShardInfo(shard_id=f"n{n}s{k}", node_id=f"n{n}", capacity=capacity)
        for n in range(nodes)
        for k in range(per_node)
    ]


def experts(n: int, layers: int = 1) -> list[ExpertKey]:
    return [(layer, e) for layer in range(layers) for e in range(n)]


def node_of(shards: list[ShardInfo]) -> dict[str, str]:
    return {s.shard_id: s.node_id for s in shards}


def zipf(keys: list[ExpertKey], s: float = 1.0, seed: int = 0) -> dict[ExpertKey, float]:
    ranks = list(range(1, len(keys) + 1))
    random.Random(seed).shuffle(ranks)
    return {k: 1.0 / r**s for k, r in zip(keys, ranks, strict=True)}


def apply_in_order(table: PlacementTable, plan: PlacementPlan) -> list[int]:
    """Apply plan.moves one by one; return the fewest replicas any expert had on the way."""
    live = {e: set(ids) for e, ids in table.replicas.items()}
    lowest = []
    for move in plan.moves:
        held = live.setdefault(move.expert, set())
        (held.add if move.kind == "add" else held.remove)(move.shard_id)
        lowest.append(len(held))
    assert live == {e: set(ids) for e, ids in plan.table.replicas.items()}
    return lowest


# --- initial placement ---------------------------------------------------------------------


def test_initial_placement_spreads_counts_evenly() -> None:
    shards = make_shards(4, 1)
    plan = place(experts(8), shards)
    per_shard = {sid: len(es) for sid, es in plan.table.by_shard().items()}
    assert sorted(per_shard.values()) == [4, 4, 4, 4]
    assert plan.warnings == ()
    assert all(m.kind == "add" for m in plan.moves) and len(plan.moves) == 16
    assert plan.table.version == 1


@pytest.mark.parametrize(
    ("nodes", "per_node", "n_experts", "min_replicas"),
    [(3, 2, 12, 2), (4, 4, 64, 3), (2, 1, 5, 2), (8, 2, 100, 2)],
)
def test_min_replicas_on_distinct_nodes(
    nodes: int, per_node: int, n_experts: int, min_replicas: int
) -> None:
    shards = make_shards(nodes, per_node)
    plan = place(experts(n_experts), shards, min_replicas=min_replicas)
    nodes_of = node_of(shards)
    for ids in plan.table.replicas.values():
        assert len(ids) == min_replicas
        assert len({nodes_of[s] for s in ids}) == min_replicas  # anti-affinity
    assert plan.warnings == ()


def test_fewer_nodes_than_replicas_uses_distinct_shards_of_one_node() -> None:
    shards = make_shards(1, 3)
    plan = place(experts(6), shards, min_replicas=2)
    assert all(len(set(ids)) == 2 for ids in plan.table.replicas.values())
    assert plan.warnings == ()  # sharing a node is unavoidable here, so not reported


def test_fewer_shards_than_min_replicas_places_what_fits_and_says_so() -> None:
    plan = place(experts(4), make_shards(2, 1), min_replicas=3)
    assert all(len(set(ids)) == len(ids) == 2 for ids in plan.table.replicas.values())
    assert any("min_replicas=3" in w for w in plan.warnings)


def test_capacity_limits_are_respected() -> None:
    shards = make_shards(4, 1, capacity=5)
    plan = place(experts(10), shards, num_slots=20)
    assert all(len(es) <= 5 for es in plan.table.by_shard().values())
    assert plan.table.total_replicas() == 20


# --- EPLB replication ------------------------------------------------------------------------


def test_hot_experts_get_more_replicas() -> None:
    keys = experts(16)
    load = {k: 1.0 for k in keys} | {keys[0]: 20.0, keys[1]: 10.0}
    counts = replica_counts(load, num_slots=48, num_shards=16, min_replicas=2)
    assert sum(counts.values()) == 48
    assert counts[keys[0]] > counts[keys[1]] > 2
    assert all(counts[k] == 2 for k in keys[2:])


def test_replica_counts_leave_no_improving_swap() -> None:
    """Greedy optimality: no replica taken from one expert and given to another lowers the max."""
    load = zipf(experts(40), s=1.2)
    counts = replica_counts(load, num_slots=140, num_shards=50, min_replicas=2)
    peak = max(load[e] / n for e, n in counts.items())
    for e, n in counts.items():
        if n > 2:
            assert load[e] / (n - 1) >= peak * (1 - 1e-12)


def test_eplb_evens_load_per_replica_when_the_floor_does_not_bind() -> None:
    """With slots to spare for every expert, max/mean load per replica is close to 1."""
    load = zipf(experts(32), s=0.5)
    counts = replica_counts(load, num_slots=1000, num_shards=128, min_replicas=2)
    per_replica = [load[e] / n for e, n in counts.items() for _ in range(n)]
    assert max(per_replica) / (sum(per_replica) / len(per_replica)) <= 1.05
    assert min(counts.values()) > 2


def test_short_slot_budget_keeps_one_replica_each_and_gives_hottest_a_second() -> None:
    keys = experts(4)
    load = dict(zip(keys, [4.0, 3.0, 2.0, 1.0], strict=True))
    counts = replica_counts(load, num_slots=6, num_shards=4, min_replicas=2)
    assert [counts[k] for k in keys] == [2, 2, 1, 1]


def test_zipf_balance_small_cluster() -> None:
    """64 nodes × 4 shards, 512 experts: shard max/mean ≤ 1.05 (naive round robin is far off)."""
    shards = make_shards(64, 4, capacity=16)
    keys = experts(64, layers=8)
    load = zipf(keys)
    slots = balanced_slots(load, len(shards))
    plan = place(keys, shards, load=load, num_slots=slots)
    replica_ratio, shard_ratio = balance_ratios(plan.table, load, [s.shard_id for s in shards])
    assert shard_ratio <= 1.05
    # no replica carries more than a shard's fair share: the slot budget did its job
    assert max(load[e] / len(ids) for e, ids in plan.table.replicas.items()) <= (
        sum(load.values()) / len(shards) * (1 + 1e-9)
    )
    assert plan.warnings == ()
    naive = PlacementTable(
        version=1,
        replicas={
            e: tuple(shards[(2 * i + j) % len(shards)].shard_id for j in range(2))
            for i, e in enumerate(keys)
        },
    )
    assert balance_ratios(naive, load, [s.shard_id for s in shards])[1] > 5 * shard_ratio
    assert replica_ratio > 1.0  # floor replicas of cold experts pull the per-replica mean down


def test_slots_for_replica_balance_is_the_fewest_that_meet_the_ratio() -> None:
    """Per-layer Zipf load: the budget it returns gives per-replica max/mean <= 1.05 once the
    replicas are placed, and one slot fewer does not (the greedy fill is the same one)."""
    shards = make_shards(32, 4, capacity=None)
    keys = experts(16, layers=8)
    load = {
        (layer, e): v for layer in range(8) for (_, e), v in zipf(experts(16), seed=layer).items()
    }
    slots = slots_for_replica_balance(load, len(shards), max_ratio=1.05)
    ids = [s.shard_id for s in shards]
    plan = place(keys, shards, load=load, num_slots=slots)
    assert plan.table.total_replicas() == slots
    assert balance_ratios(plan.table, load, ids)[0] <= 1.05
    fewer = replica_counts(load, num_slots=slots - 1, num_shards=len(shards))
    per_replica = [load[e] / n for e, n in fewer.items()]
    assert max(per_replica) * (slots - 1) / sum(load.values()) > 1.05
    # a looser target needs fewer slots; uniform load needs only the floor
    assert slots_for_replica_balance(load, len(shards), max_ratio=1.5) < slots
    uniform = dict.fromkeys(keys, 1.0)
    assert slots_for_replica_balance(uniform, len(shards)) == 2 * len(keys)


def test_cluster_scale_placement_balances_replicas_and_shards() -> None:
    """The issue's simulation (bench/placement_sim.py): 1024 nodes x 4 shards, 4096 experts in
    64 layers, Zipf(1.0) load within each layer. At the budget slots_for_replica_balance gives,
    load per replica and per shard are within 1.05 of the mean, and round robin is far off."""
    rng = random.Random(0)
    load: dict[ExpertKey, float] = {}
    for layer in range(64):
        ranks = list(range(1, 65))
        rng.shuffle(ranks)
        load |= {(layer, e): 1.0 / r for e, r in enumerate(ranks)}
    shards = make_shards(1024, 4, capacity=16)
    ids = [s.shard_id for s in shards]
    slots = slots_for_replica_balance(load, len(shards), max_ratio=1.05)
    assert len(load) * 2 < slots <= 16 * len(shards)
    plan = place(list(load), shards, load=load, num_slots=slots)
    replica_ratio, shard_ratio = balance_ratios(plan.table, load, ids)
    assert replica_ratio <= 1.05 and shard_ratio <= 1.05
    assert plan.warnings == ()
    counts = [len(r) for r in plan.table.replicas.values()]
    assert min(counts) >= 2 and plan.table.total_replicas() == slots


def test_slots_for_replica_balance_names_the_expert_that_makes_it_impossible() -> None:
    load = {(0, 0): 100.0, (0, 1): 1.0, (0, 2): 1.0}  # (0, 0) would need > 4 replicas
    with pytest.raises(PlacementError, match=r"expert \(0, 0\).*each of the 4 shards"):
        slots_for_replica_balance(load, 4)
    with pytest.raises(PlacementError, match="max_ratio"):
        slots_for_replica_balance(load, 4, max_ratio=0.9)


# --- rebalance -------------------------------------------------------------------------------


def test_rebalance_with_unchanged_input_moves_nothing() -> None:
    shards = make_shards(16, 2, capacity=12)
    keys = experts(32, layers=4)
    load = zipf(keys)
    plan = place(keys, shards, load=load, num_slots=balanced_slots(load, len(shards)))
    again = rebalance(plan.table, shards, load)
    assert again.moves == ()
    assert again.table == plan.table  # same version too: routers need not refresh


@pytest.mark.parametrize(("rank", "factor"), [(64, 3.0), (96, 3.0), (120, 3.0), (0, 50.0)])
def test_rebalance_after_one_expert_changes_moves_few_replicas(rank: int, factor: float) -> None:
    shards = make_shards(16, 2)
    ids = [s.shard_id for s in shards]
    keys = experts(32, layers=4)
    load = zipf(keys)
    plan = place(keys, shards, load=load, num_slots=balanced_slots(load, len(shards)))
    changed = sorted(keys, key=load.__getitem__)[rank]
    hotter = dict(load) | {changed: load[changed] * factor}
    new = rebalance(plan.table, shards, hotter)
    total = plan.table.total_replicas()
    assert 0 < len(new.moves) <= 0.2 * total
    assert new.table.total_replicas() == total
    assert new.table.version == plan.table.version + 1
    assert min(apply_in_order(plan.table, new)) >= 1
    # placing from scratch balances no better but moves far more
    fresh = place(keys, shards, load=hotter, num_slots=total).table
    churn = sum(len(set(plan.table.replicas[e]) ^ set(fresh.replicas[e])) for e in keys)
    assert len(new.moves) * 4 <= churn
    assert balance_ratios(new.table, hotter, ids)[1] <= balance_ratios(fresh, hotter, ids)[1] + 0.05


def test_rebalance_places_a_newly_added_expert() -> None:
    shards = make_shards(4, 1)
    plan = place(experts(6), shards)
    load = {k: 1.0 for k in experts(7)}
    new = rebalance(plan.table, shards, load, num_slots=14)
    assert new.table.replica_count((0, 6)) == 2
    assert all(new.table.replica_count(k) == 2 for k in experts(6))


def test_moves_list_adds_before_drops() -> None:
    shards = make_shards(6, 1)
    keys = experts(12)
    plan = place(keys, shards, load={k: 1.0 for k in keys}, num_slots=30)
    shifted = {k: 1.0 for k in keys} | {keys[0]: 30.0}
    kinds = [m.kind for m in rebalance(plan.table, shards, shifted).moves]
    assert "drop" in kinds and kinds == sorted(kinds)  # "add" < "drop"


# --- heal ------------------------------------------------------------------------------------


def test_heal_restores_min_replicas_without_moving_unaffected_replicas() -> None:
    shards = make_shards(4, 2)
    keys = experts(24)
    plan = place(keys, shards, load=zipf(keys), num_slots=60)
    dead = "n1s0"
    healed = heal(plan.table, shards, [dead], load=zipf(keys))
    lost = {e for e, ids in plan.table.replicas.items() if dead in ids}
    for e, ids in plan.table.replicas.items():
        after = healed.table.replicas[e]
        assert dead not in after
        assert {s for s in ids if s != dead} <= set(after)  # survivors stay where they are
        assert len(after) >= 2
    assert {m.expert for m in healed.moves if m.kind == "add"} <= lost
    assert {m.shard_id for m in healed.moves if m.kind == "drop"} == {dead}
    nodes_of = node_of(shards)
    for move in healed.moves:  # each new replica lands on a node its expert was missing from
        if move.kind == "add":
            others = [nodes_of[s] for s in healed.table.replicas[move.expert] if s != move.shard_id]
            assert nodes_of[move.shard_id] not in others


def test_heal_under_tight_capacity_keeps_every_expert_alive() -> None:
    shards = make_shards(3, 1, capacity=2)
    keys = experts(3)
    plan = place(keys, shards, load={keys[0]: 5.0, keys[1]: 2.0, keys[2]: 1.0})
    healed = heal(plan.table, shards, ["n0s0"], load={keys[0]: 5.0, keys[1]: 2.0, keys[2]: 1.0})
    assert all(healed.table.replica_count(k) >= 1 for k in keys)
    assert healed.table.replica_count(keys[0]) == 2  # hottest keeps its floor
    assert any("min_replicas=2" in w for w in healed.warnings)


def test_heal_with_no_live_shards_raises_clearly() -> None:
    shards = make_shards(2, 1)
    plan = place(experts(3), shards)
    with pytest.raises(PlacementError, match="no live shards"):
        heal(plan.table, shards, ["n0s0", "n1s0"])


def test_too_little_capacity_names_the_numbers() -> None:
    with pytest.raises(PlacementError, match=r"at most 4 replicas .* the 5 experts"):
        place(experts(5), make_shards(2, 1, capacity=2))
    with pytest.raises(ValueError):  # PlacementError is a ValueError
        place(experts(5), [])


# --- scale-out / scale-in ---------------------------------------------------------------------


def test_scale_out_gives_new_shards_the_hottest_experts_first() -> None:
    shards = make_shards(4, 1, capacity=4)  # full: 8 experts × 2 replicas
    keys = experts(8)
    load = dict(zip(keys, [100.0, 90.0, 80.0, 70.0, 9.0, 8.0, 7.0, 6.0], strict=True))
    plan = place(keys, shards, load=load)
    new = make_shards(6, 1, capacity=3)[4:]
    out = scale_out(plan.table, shards, new, load)
    assert out.table.total_replicas() == plan.table.total_replicas() + 6
    loaded = {sid: out.adds_for(sid) for sid in ("n4s0", "n5s0")}
    for got in loaded.values():
        assert got == sorted(got, key=load.__getitem__, reverse=True)  # hottest first
        assert set(got) <= set(keys[:4])
    assert out.adds_for("n4s0")[0] == keys[0]
    assert min(apply_in_order(plan.table, out)) >= 1


@pytest.mark.parametrize("drain", [["n0s0", "n1s0"], ["n0s0", "n0s1", "n1s0"]])
def test_scale_in_never_drops_a_last_replica(drain: list[str]) -> None:
    shards = make_shards(4, 2, capacity=10)
    keys = experts(10)
    nodes_of = node_of(shards)
    # several experts live only on shards that are going away
    replicas = {k: ("n0s0", "n1s0") for k in keys[:4]} | {k: ("n2s0", "n3s1") for k in keys[4:]}
    table = PlacementTable(version=7, replicas=replicas)
    plan = scale_in(table, shards, {k: 1.0 for k in keys}, shard_ids=drain)
    assert plan.drain == tuple(drain)
    assert min(apply_in_order(table, plan)) >= 1
    for ids in plan.table.replicas.values():
        assert len(ids) == 2 and not set(ids) & set(drain)
        assert len({nodes_of[s] for s in ids}) == 2
    assert plan.table.version == 8


def test_scale_in_by_count_drains_the_least_unique_shard() -> None:
    shards = [*make_shards(3, 1), ShardInfo(shard_id="extra", node_id="n3")]
    keys = experts(3)
    table = PlacementTable(
        version=1,
        replicas={
            keys[0]: ("n0s0", "n1s0", "extra"),
            keys[1]: ("n1s0", "n2s0"),
            keys[2]: ("n0s0", "n2s0"),
        },
    )
    plan = scale_in(table, shards, None, count=1)
    assert plan.drain == ("extra",)
    assert plan.moves == (plan.moves[0],) and plan.moves[0].kind == "drop"


def test_scale_in_rejects_unknown_or_ambiguous_requests() -> None:
    shards = make_shards(2, 1)
    table = place(experts(2), shards).table
    with pytest.raises(PlacementError, match="unknown shards"):
        scale_in(table, shards, shard_ids=["nope"])
    with pytest.raises(PlacementError, match="exactly one"):
        scale_in(table, shards)


@pytest.mark.parametrize("seed", range(30))
def test_random_clusters_keep_the_invariants(seed: int) -> None:
    """Random clusters, loads, deaths and drains: no shard twice, capacity kept, floor met,
    unchanged input moves nothing, and applying moves in order never empties an expert."""
    r = random.Random(seed)
    nodes, per_node, n_experts = r.randint(1, 6), r.randint(1, 3), r.randint(1, 20)
    min_replicas = r.randint(1, 3)
    capacity = r.choice([None, -(-3 * n_experts // (nodes * per_node))])
    shards = make_shards(nodes, per_node, capacity)
    keys = experts(n_experts)
    load = {k: r.choice([0.0, r.random(), 10 * r.random()]) for k in keys}

    def check(plan: PlacementPlan, live: list[ShardInfo], floor: int) -> None:
        ids = {s.shard_id for s in live}
        for ids_of_e in plan.table.replicas.values():
            assert len(set(ids_of_e)) == len(ids_of_e) >= floor and set(ids_of_e) <= ids
        for held in plan.table.by_shard().values():
            assert capacity is None or len(held) <= capacity

    plan = place(keys, shards, load=load, num_slots=r.randint(n_experts, 3 * n_experts))
    check(plan, shards, 1)
    plan = place(keys, shards, load=load, min_replicas=min_replicas)
    check(plan, shards, min(min_replicas, len(shards)))
    assert rebalance(plan.table, shards, load, min_replicas=min_replicas).moves == ()
    shifted = {k: r.random() for k in keys}
    moved = rebalance(plan.table, shards, shifted, min_replicas=min_replicas)
    check(moved, shards, min(min_replicas, len(shards)))
    assert min(apply_in_order(plan.table, moved), default=1) >= 1
    if len(shards) > 1:
        dead = r.sample([s.shard_id for s in shards], r.randint(1, len(shards) - 1))
        live = [s for s in shards if s.shard_id not in dead]
        if capacity is None or capacity * len(live) >= n_experts:
            check(heal(moved.table, shards, dead, load=shifted), live, 1)
            drained = scale_in(moved.table, shards, shifted, shard_ids=dead)
            check(drained, live, 1)
            assert min(apply_in_order(moved.table, drained), default=1) >= 1


# --- table record and load EMA ---------------------------------------------------------------


def test_table_json_round_trip() -> None:
    table = place(experts(4, layers=2), make_shards(3, 1)).table
    text = table.to_json()
    assert "1:3" in json.loads(text)["replicas"]
    assert PlacementTable.from_json(text) == table
    assert table.experts_on("n0s0") == sorted(table.by_shard()["n0s0"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"version": 1, "replicas": {"3-4": ["a"]}}', "not 'layer:expert'"),
        ('{"version": 1, "replicas": {"0:1": ["a", "a"]}}', "lists a shard twice"),
        ('{"replicas": {}}', "not a valid JSON table"),
    ],
)
def test_table_json_errors_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        PlacementTable.from_json(text)


def test_load_ema() -> None:
    ema = update_load_ema({(0, 0): 10.0, (0, 1): 4.0}, {(0, 0): 20.0, (0, 2): 6.0}, alpha=0.5)
    assert ema == {(0, 0): 15.0, (0, 1): 2.0, (0, 2): 6.0}
    with pytest.raises(PlacementError, match="alpha"):
        update_load_ema({}, {}, alpha=0.0)


# --- autoscaling (fake clock) ----------------------------------------------------------------


def snap(n: int, busy: float, *, queue: float = 0.0, experts: int = 0) -> LoadSnapshot:
    return LoadSnapshot(
        num_shards=n,
        shard_load={f"s{i}": busy for i in range(n)},
        queue_depth=queue,
        num_experts=experts,
    )


CFG = AutoscaleConfig(min_shards=2, max_shards=20, target_utilisation=0.5)


def test_autoscale_scales_up_under_load() -> None:
    target, state = autoscale(snap(4, 0.9), AutoscaleState(), CFG, now=0.0)
    assert target == 8  # 4 × 0.9 / 0.5 = 7.2 shards of demand
    assert state.last_scaled_at == 0.0


def test_autoscale_upscale_cooldown_is_respected() -> None:
    target, state = autoscale(snap(4, 0.9), AutoscaleState(), CFG, now=0.0)
    target, state = autoscale(snap(8, 0.9), state, CFG, now=10.0)
    assert target == 8 and "waiting" in state.reason
    target, state = autoscale(snap(8, 0.9), state, CFG, now=CFG.upscale_cooldown_s + 1)
    assert target == 15


def test_autoscale_downscale_waits_for_sustained_low_load() -> None:
    state = AutoscaleState()
    now = 1000.0
    target, state = autoscale(snap(10, 0.1), state, CFG, now=now)
    assert target == 10 and state.down_since == now
    target, state = autoscale(snap(10, 0.1), state, CFG, now=now + CFG.downscale_delay_s / 2)
    assert target == 10
    # a burst interrupts the wish to scale down, and the delay starts over
    _, state = autoscale(snap(10, 0.5), state, CFG, now=now + CFG.downscale_delay_s * 0.75)
    assert state.down_since is None
    _, state = autoscale(snap(10, 0.1), state, CFG, now=now + CFG.downscale_delay_s)
    target, _ = autoscale(snap(10, 0.1), state, CFG, now=now + CFG.downscale_delay_s * 1.5)
    assert target == 10
    target, _ = autoscale(snap(10, 0.1), state, CFG, now=now + CFG.downscale_delay_s * 2.01)
    assert target == 2


def test_autoscale_downscale_is_slower_than_upscale_after_a_change() -> None:
    _, state = autoscale(snap(4, 0.9), AutoscaleState(), CFG, now=0.0)
    quiet = AutoscaleConfig(
        min_shards=2, max_shards=20, target_utilisation=0.5, downscale_delay_s=0.0
    )
    target, state = autoscale(snap(8, 0.05), state, quiet, now=60.0)
    assert target == 8  # past the upscale cooldown, still inside the downscale cooldown
    target, _ = autoscale(snap(8, 0.05), state, quiet, now=quiet.downscale_cooldown_s + 1)
    assert target == 2


@pytest.mark.parametrize("busy", [0.52, 0.5, 0.46])
def test_autoscale_hysteresis_holds_near_target(busy: float) -> None:
    target, state = autoscale(snap(10, busy), AutoscaleState(), CFG, now=0.0)
    assert target == 10 and state.up_since is None and state.down_since is None


def test_autoscale_respects_min_max_and_replica_floor() -> None:
    target, _ = autoscale(snap(18, 1.0), AutoscaleState(), CFG, now=0.0)
    assert target == 20
    low = AutoscaleConfig(min_shards=1, max_shards=20, downscale_delay_s=0, downscale_cooldown_s=0)
    target, _ = autoscale(snap(6, 0.0, experts=10), AutoscaleState(), low, now=0.0)
    assert target == 2  # min_replicas=2 needs two shards even with no load
    tight = AutoscaleConfig(max_shards=4, experts_per_shard=8)
    assert required_shards(32, 2, 8) == 8
    target, state = autoscale(snap(4, 0.0, experts=32), AutoscaleState(), tight, now=5.0)
    assert target == 8 and "replica floor 8" in state.reason  # the floor beats max_shards


def test_autoscale_never_grows_past_what_the_cluster_can_place() -> None:
    def busy(n: int, capacity: int) -> LoadSnapshot:
        return LoadSnapshot(
            num_shards=n, shard_load={f"s{i}": 0.9 for i in range(n)}, capacity=capacity
        )

    target, state = autoscale(busy(4, 6), AutoscaleState(), CFG, now=0.0)
    assert target == 6 and state.wanted == 8  # 7.2 shards of demand, room for 6
    assert "can place 6" in state.reason
    # at the capacity: nothing changes and no cooldown starts, the wish to grow stays
    target, held = autoscale(busy(6, 6), state, CFG, now=CFG.upscale_cooldown_s + 1)
    assert target == 6 and held.wanted == 11 and held.last_scaled_at == 0.0
    # the cluster grew (KubeRay added a node): the next call scales at once
    target, _ = autoscale(busy(6, 20), held, CFG, now=CFG.upscale_cooldown_s + 2)
    assert target == 11
    # a capacity below the replica floor does not make the pool shrink
    target, _ = autoscale(busy(2, 1), AutoscaleState(), CFG, now=0.0)
    assert target == 2
    with pytest.raises(ValueError, match="capacity"):
        LoadSnapshot(num_shards=1, capacity=-1)


def test_autoscale_queue_depth_drives_scale_up() -> None:
    cfg = AutoscaleConfig(max_shards=64, target_queue_per_shard=4.0)
    target, _ = autoscale(snap(4, 0.3, queue=40.0), AutoscaleState(), cfg, now=0.0)
    assert target == 10


def test_autoscale_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="target_utilisation"):
        AutoscaleConfig(target_utilisation=1.5)
    with pytest.raises(ConfigError, match="max_shards"):
        AutoscaleConfig(min_shards=5, max_shards=2)
    with pytest.raises(ValueError, match="shard load must be finite"):
        LoadSnapshot(num_shards=1, shard_load={"s0": float("nan")})

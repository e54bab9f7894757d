"""place_version: a new model version's experts on shards that already hold some of them."""

from __future__ import annotations

import pytest

from expertmesh.platform.placement import PlacementError, ShardInfo, place_version


def shards(n: int, nodes: int) -> list[ShardInfo]:
    return [ShardInfo(shard_id=f"s{i}", node_id=f"n{i % nodes}") for i in range(n)]


def old_holdings() -> tuple[dict, dict]:
    """Version 1: 2 layers x 4 experts, 2 replicas each, spread over 4 shards on 2 nodes."""
    shas = {(layer, e): f"v1-{layer}-{e}" for layer in range(2) for e in range(4)}
    held: dict[str, set[str]] = {f"s{i}": set() for i in range(4)}
    for i, sha in enumerate(shas.values()):
        held[f"s{i % 4}"].add(sha)
        held[f"s{(i + 1) % 4}"].add(sha)
    return shas, held


def test_unchanged_experts_stay_where_their_bytes_are_and_load_nowhere() -> None:
    shas, held = old_holdings()
    plan = place_version(shas, shards(4, 2), held, min_replicas=2)
    assert plan.moves == ()
    for key, sha in shas.items():
        assert set(plan.table.replicas[key]) == {s for s, h in held.items() if sha in h}


def test_a_retrained_expert_gets_min_replicas_on_different_nodes() -> None:
    shas, held = old_holdings()
    new = dict(shas) | {(1, 2): "v2-1-2"}
    plan = place_version(new, shards(4, 2), held, min_replicas=2)
    adds = [(m.expert, m.shard_id) for m in plan.moves]
    assert [m.kind for m in plan.moves] == ["add", "add"]
    assert {k for k, _ in adds} == {(1, 2)}
    placed = plan.table.replicas[(1, 2)]
    assert len(placed) == 2 and {int(s[1:]) % 2 for s in placed} == {0, 1}  # both nodes
    # every other expert keeps the replicas that hold its bytes
    assert all(plan.table.replicas[k] for k in shas)


def test_an_added_expert_and_a_grown_layer_go_to_the_emptiest_shards() -> None:
    shas, held = old_holdings()
    held["s4"] = set()  # a shard holding nothing (e.g. taken from the spares)
    new = dict(shas) | {(1, 4): "v2-1-4"}  # add_expert grew layer 1 to 5 experts
    plan = place_version(new, shards(5, 2), held, min_replicas=2)
    assert set(plan.adds_for("s4")) == {(1, 4)}
    assert len(plan.table.replicas[(1, 4)]) == 2
    assert len({s for s in plan.table.replicas[(1, 4)]} & {"s4"}) == 1


def test_identical_bytes_under_another_key_are_shared() -> None:
    """Identity is the checksum, not the (layer, expert): a copied expert loads nowhere."""
    shas, held = old_holdings()
    new = dict(shas) | {(0, 4): shas[(0, 1)]}
    plan = place_version(new, shards(4, 2), held, min_replicas=2)
    assert plan.moves == ()
    assert plan.table.replicas[(0, 4)] == plan.table.replicas[(0, 1)]


def test_extra_holders_are_kept_and_few_shards_warn() -> None:
    held = {"s0": {"a"}, "s1": {"a"}, "s2": {"a"}}
    plan = place_version({(0, 0): "a", (0, 1): "b"}, shards(3, 1), held, min_replicas=2)
    assert plan.table.replicas[(0, 0)] == ("s0", "s1", "s2")
    assert len(plan.table.replicas[(0, 1)]) == 2 and plan.warnings == ()
    plan = place_version({(0, 0): "b"}, shards(1, 1), {}, min_replicas=2)
    assert plan.table.replicas[(0, 0)] == ("s0",) and "cannot hold 2 replicas" in plan.warnings[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (({(0, 0): "a"}, [], {}), "no live shards"),
        (({(0, 0): "a"}, shards(2, 1), {"s9": {"a"}}), r"not in service: \['s9'\]"),
        (({(0, -1): "a"}, shards(2, 1), {}), "expert"),
    ],
)
def test_bad_input_is_refused(args, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        place_version(*args)
    with pytest.raises(PlacementError, match="min_replicas"):
        place_version({(0, 0): "a"}, shards(2, 1), {}, min_replicas=0)

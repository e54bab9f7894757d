"""Replica choice of the Ray dispatcher: few shards per layer call, spread over steps."""

from __future__ import annotations

from collections import Counter

from expertmesh.actors.dispatch import cover

# 8 experts, 2 replicas each on 4 shards, as the placement lays them out for 4 shards
OPTIONS = {
    0: ["s0", "s1"],
    1: ["s0", "s2"],
    2: ["s0", "s3"],
    3: ["s0", "s1"],
    4: ["s1", "s2"],
    5: ["s2", "s3"],
    6: ["s1", "s3"],
    7: ["s2", "s3"],
}


def test_every_expert_gets_one_of_its_replicas() -> None:
    for turn in range(8):
        got = cover(OPTIONS, turn)
        assert set(got) == set(OPTIONS)
        assert all(got[e] in OPTIONS[e] for e in OPTIONS)


def test_fewer_shards_than_picking_replicas_one_by_one() -> None:
    for turn in range(8):
        assert len(set(cover(OPTIONS, turn).values())) <= 3
    # complementary shards: two calls cover the layer
    halves = {e: (["a", "c"] if e < 4 else ["b", "d"]) for e in range(8)}
    assert all(len(set(cover(halves, t).values())) == 2 for t in range(4))


def test_turns_spread_work_over_all_replicas() -> None:
    used = Counter()
    for turn in range(40):
        used.update(cover(OPTIONS, turn).values())
    assert set(used) == {"s0", "s1", "s2", "s3"}
    assert max(used.values()) <= 2 * min(used.values())


def test_single_candidate_and_empty() -> None:
    assert cover({3: ["s9"]}, 5) == {3: "s9"}
    assert cover({}, 0) == {}

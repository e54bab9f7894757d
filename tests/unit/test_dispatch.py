"""Replica choice and call deadline of the Ray dispatcher."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from expertmesh.actors.dispatch import (
    AdaptiveDeadline,
    NoReplicaError,
    PlacementView,
    RayDispatcher,
    cover,
)

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


def test_calls_so_far_even_out_identical_replicas() -> None:
    """Two pairs of shards with identical experts (the 4-shard placement): fed the calls made so
    far, the cover alternates within each pair, so every shard takes exactly half its pair's
    calls (rotation alone gave one of them 3 calls in 4)."""
    halves = {e: (["s0", "s1"] if e % 2 == 0 else ["s2", "s3"]) for e in range(8)}
    used: Counter[str] = Counter()
    for turn in range(40):
        picked = set(cover(halves, turn, used).values())
        assert len(picked) == 2
        used.update(picked)
    assert used == {"s0": 20, "s1": 20, "s2": 20, "s3": 20}


def test_single_candidate_and_empty() -> None:
    assert cover({3: ["s9"]}, 5) == {3: "s9"}
    assert cover({}, 0) == {}


def test_deadline_floor_until_enough_samples() -> None:
    d = AdaptiveDeadline(floor_s=2.0, min_samples=16)
    for _ in range(15):
        d.observe(5.0)
    assert d.current() == 2.0  # too few calls seen to trust them


def test_deadline_follows_slow_calls_and_comes_back() -> None:
    d = AdaptiveDeadline(floor_s=2.0, factor=4.0, ceiling_s=30.0)
    for _ in range(100):
        d.observe(0.01)  # healthy: fast calls keep the floor
    assert d.current() == 2.0
    for _ in range(256):
        d.observe(1.5)  # starved machine: every call slow but alive
    assert d.current() == 6.0
    for _ in range(256):
        d.observe(20.0)
    assert d.current() == 30.0  # capped
    for _ in range(256):
        d.observe(0.02)  # the window forgets the slow period
    assert d.current() == 2.0


def test_a_failed_shard_is_avoided_for_a_while_then_used_again() -> None:
    """A shard whose call failed gets no work while suspect; once ``suspect_s`` has passed it
    gets its share back (a slow shard is not shut out until the next placement)."""
    replicas = {(0, e): ["a", "b"] for e in range(4)}
    view = PlacementView(version=1, replicas=replicas, handles={"a": object(), "b": object()})
    d = RayDispatcher(view, transport="ray", suspect_s=30.0)
    d.suspect["a"] = time.monotonic()
    assert {d._assign(0, dict.fromkeys([0, 1, 2, 3], 1), set())[e] for e in range(4)} == {"b"}
    assert set(d._assign(0, {0: 1}, {"b"}).values()) == {"a"}  # the only replica left: tried
    d.suspect["a"] = time.monotonic() - 31.0
    picked = [
        s for _ in range(4) for s in d._assign(0, dict.fromkeys([0, 1, 2, 3], 1), set()).values()
    ]
    assert "a" in picked and "a" not in d.suspect


def test_a_last_replica_that_only_timed_out_is_tried_again() -> None:
    """When every replica of an expert failed this layer, one that only timed out (alive but
    slow, e.g. starved of CPU) gets the work again; a dead one never does."""
    replicas = {(0, e): ["a", "b"] for e in range(2)}
    view = PlacementView(version=1, replicas=replicas, handles={"a": object(), "b": object()})
    d = RayDispatcher(view, transport="ray")
    with pytest.raises(NoReplicaError, match=r"no live replica of expert \(0, 0\)"):
        d._assign(0, {0: 1, 1: 1}, {"a", "b"})
    assert d._assign(0, {0: 1, 1: 1}, {"a", "b"}, slow={"b"}) == {0: "b", 1: "b"}


def test_cover_balances_rows_among_the_shards_it_picks() -> None:
    """Two shards cover the layer between them and four experts are on both: those go where
    they even out the rows (the round waits for the slower shard)."""
    overlap = {e: (["a"] if e < 2 else ["b"] if e > 5 else ["a", "b"]) for e in range(8)}
    rows = {0: 40, 1: 30, 2: 20, 3: 10, 4: 10, 5: 8, 6: 6, 7: 4}

    def loads(assigned: dict[int, str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e, s in assigned.items():
            out[s] = out.get(s, 0) + rows[e]
        return out

    plain_max = []
    for turn in range(4):
        plain, balanced = cover(overlap, turn), cover(overlap, turn, rows=rows)
        assert set(plain.values()) == set(balanced.values()) == {"a", "b"}  # the same calls
        assert all(balanced[e] in overlap[e] for e in range(8))
        # a must take experts 0 and 1 (70 rows); everything else fits on b (58)
        assert loads(balanced) == {"a": 70, "b": 58}
        plain_max.append(max(loads(plain).values()))
    assert max(plain_max) == 118  # without rows: on some turns a takes experts 0-5
    halves = {e: ["a", "b"] for e in range(8)}
    assert len(set(cover(halves, 0, rows=rows).values())) == 1  # one call: nothing to balance


def test_a_shard_the_greedy_never_picks_still_takes_work() -> None:
    """ "a" holds every expert and covers the layer alone; "b" and "c" (a scale-out's new
    shards) hold fewer and would never be called. Once one of them has had less than half the
    mean calls it goes first, so all three serve, and "a" still takes most rounds alone."""
    options = {e: (["a", "b"] if e < 6 else ["a", "c"]) for e in range(8)}
    used: Counter[str] = Counter()
    calls = []
    for turn in range(60):
        picked = set(cover(options, turn, used).values())
        used.update(picked)
        calls.append(len(picked))
    assert set(used) == {"a", "b", "c"}
    assert min(used["b"], used["c"]) >= used["a"] / 4
    assert calls.count(1) > calls.count(2)  # mostly still one call per layer


def test_no_starvation_rule_without_history() -> None:
    """With no calls yet (or a placement just changed) nothing is starved: the plain cover."""
    options = {e: (["a", "b"] if e < 6 else ["a", "c"]) for e in range(8)}
    assert set(cover(options, 0, Counter()).values()) == {"a"}

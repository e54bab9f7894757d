"""Replica choice and call deadline of the Ray dispatcher."""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pytest

from expertmesh.actors.breaker import Breakers
from expertmesh.actors.channel import ChannelError, ChannelTimeout
from expertmesh.actors.remote_dispatch import (
    AdaptiveDeadline,
    NoReplicaError,
    PlacementView,
    RayDispatcher,
    Round,
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
    """A shard whose call failed with an error gets no work while its breaker is open; once
    ``suspect_s`` has passed it is picked again (a probe), not shut out until the next
    placement."""
    replicas = {(0, e): ["a", "b"] for e in range(4)}
    view = PlacementView(version=1, replicas=replicas, handles={"a": object(), "b": object()})
    d = RayDispatcher(view, transport="ray", suspect_s=30.0)
    d.breakers.failed("a", time.monotonic(), timed_out=False)
    assert {d._assign(0, dict.fromkeys([0, 1, 2, 3], 1), set())[e] for e in range(4)} == {"b"}
    assert set(d._assign(0, {0: 1}, {"b"}).values()) == {"a"}  # the only replica left: tried
    d.breakers.failed("a", time.monotonic() - 31.0, timed_out=False)
    picked = [
        s for _ in range(4) for s in d._assign(0, dict.fromkeys([0, 1, 2, 3], 1), set()).values()
    ]
    assert "a" in picked


class FakeChannel:
    """A sent request's connection: ``receive`` answers with ``answer`` or raises it."""

    endpoint = None

    def __init__(self, answer: np.ndarray | Exception) -> None:
        self.answer = answer

    def receive(self, timeout_s: float) -> np.ndarray:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def close(self) -> None:
        pass


def answer_from(d: RayDispatcher, shard: str, answer: np.ndarray | Exception) -> None:
    """Gather a round in which ``shard`` was sent expert 0's one row and answers ``answer``."""
    now = time.monotonic()
    rnd = Round(by_shard={shard: [(0, 0, 1)]}, issued=now, deadline=now + 1.0)
    rnd.sent[shard] = FakeChannel(answer)  # type: ignore[assignment]
    d._gather(0, rnd, np.zeros((1, 4), np.float32), set(), set())


def test_a_shard_that_timed_out_is_probed_soon_and_serves_once_it_answers(caplog) -> None:
    """A shard whose call timed out (e.g. a new shard's slow first call on a busy machine) is
    left out for ``probe_s``, not the whole ``suspect_s``; then one call goes to it as a probe
    while the others still avoid it, and its answer puts it back in service."""
    replicas = {(0, e): ["a", "b"] for e in range(4)}
    view = PlacementView(version=1, replicas=replicas, handles={"a": object(), "b": object()})
    d = RayDispatcher(view, transport="ray", probe_s=0.05, suspect_s=30.0)
    d.calls_by_shard = Counter(b=10)  # "a" lags behind: the cover picks it first when it may
    rows = dict.fromkeys(range(4), 1)
    with caplog.at_level(logging.WARNING, logger="expertmesh.actors.remote_dispatch"):
        answer_from(d, "a", ChannelTimeout("no answer within 2.00s"))
    assert "shard a timed out on layer 0" in caplog.text
    assert set(d._assign(0, rows, set()).values()) == {"b"}  # open
    time.sleep(0.06)
    assert set(d._assign(0, rows, set()).values()) == {"a"}  # half-open: the probe
    assert set(d._assign(0, rows, set()).values()) == {"b"}  # the probe is out: not again
    answer_from(d, "a", np.ones((1, 4), np.float32))
    assert set(d._assign(0, rows, set()).values()) == {"a"}  # closed: back in service
    assert set(d._assign(0, rows, set()).values()) == {"a"}


def test_a_shard_that_failed_with_an_error_is_not_probed_soon(caplog) -> None:
    """A broken connection (a dead shard) keeps the shard out for ``suspect_s``: no calls to
    it every ``probe_s``."""
    replicas = {(0, e): ["a", "b"] for e in range(4)}
    view = PlacementView(version=1, replicas=replicas, handles={"a": object(), "b": object()})
    d = RayDispatcher(view, transport="ray", probe_s=0.01, suspect_s=30.0)
    d.calls_by_shard = Counter(b=10)
    with caplog.at_level(logging.WARNING, logger="expertmesh.actors.remote_dispatch"):
        answer_from(d, "a", ChannelError("receive failed: connection reset by peer"))
    assert "shard a failed layer 0" in caplog.text and "for 30.0s" in caplog.text
    time.sleep(0.03)
    assert set(d._assign(0, dict.fromkeys(range(4), 1), set()).values()) == {"b"}


def test_breaker_backoff_doubles_with_timeouts_in_a_row_up_to_suspect_s() -> None:
    b = Breakers(probe_s=1.0, suspect_s=10.0)
    assert [b.failed("a", 0.0, timed_out=True) for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    assert b.failed("a", 0.0, timed_out=False) == 10
    assert b.succeeded("a") and not b.succeeded("a")
    assert b.failed("a", 0.0, timed_out=True) == 1  # a new streak starts short again


def test_breaker_half_open_lets_one_probe_through_until_it_resolves() -> None:
    b = Breakers(probe_s=1.0, suspect_s=10.0)
    b.failed("a", 100.0, timed_out=True)
    assert b.avoided(100.5) == {"a"}  # open
    b.probing(["a"], 100.5)  # picked anyway (every replica avoided): not the probe
    assert b.avoided(101.0) == set()  # half-open
    b.probing(["a"], 101.0)
    assert b.avoided(101.5) == {"a"}  # its probe is out
    assert b.avoided(111.5) == set()  # a probe never answered (step abandoned) expires
    b.failed("a", 112.0, timed_out=True)  # the probe timed out: open again, for longer
    assert b.avoided(113.5) == {"a"} and b.avoided(114.0) == set()
    b.keep({"b"})  # left the placement
    assert b.shards == {}


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

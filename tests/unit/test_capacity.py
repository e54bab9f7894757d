"""How many shards a cluster can place (pure) and the controller's persisted event log."""

from __future__ import annotations

import json

import pytest
from pyarrow import fs

from expertmesh.actors.events import MAX_PAGE, EventLog
from expertmesh.platform.capacity import Capacity, room_per_node, shard_demand


def test_room_counts_every_resource_a_shard_asks_for() -> None:
    free = {
        "head": {"CPU": 1.5, "memory": 1e9},  # no expert_shard resource: shards stay off it
        "w1": {"CPU": 0.75, "expert_shard": 4.0},  # CPU-bound: 3 shards of 0.25
        "w2": {"CPU": 8.0, "expert_shard": 2.0},  # expert_shard-bound: 2
    }
    need = shard_demand(0.25, 0.0, {"expert_shard": 1.0})
    assert need == {"CPU": 0.25, "expert_shard": 1.0}
    assert room_per_node(free, need) == {"head": 0, "w1": 3, "w2": 2}
    assert room_per_node({"gpu-less": {"CPU": 8.0}}, shard_demand(1, 1, None)) == {"gpu-less": 0}
    assert room_per_node(free, shard_demand(0, 0, None)) is None  # asks for nothing: unbounded


def test_capacity_limit_is_the_smaller_of_placeable_and_configured() -> None:
    cap = Capacity(in_service=4, spares=1, room={"a": 3, "b": 0}, max_shards=None)
    assert cap.placeable == 8 and cap.limit == 8
    assert Capacity(in_service=4, spares=1, room={"a": 3}, max_shards=6).limit == 6
    assert Capacity(in_service=4, spares=0, room=None, max_shards=None).limit is None


def local_log(tmp_path, session: str = "s1", **kw) -> EventLog:
    return EventLog(fs.LocalFileSystem(), str(tmp_path / "events"), session, **kw)


def test_event_log_survives_a_restart_with_seq_continuing(tmp_path) -> None:
    log = local_log(tmp_path, segment_events=4, keep_segments=3)
    for i in range(10):
        log.append("tick", f"event {i}", {"i": i})
    again = local_log(tmp_path, segment_events=4, keep_segments=3)  # a restarted controller
    assert [e["seq"] for e in again.page()["events"]] == list(range(1, 11))
    again.append("tick", "after the restart", {})
    seqs = [
        e["seq"] for e in local_log(tmp_path, segment_events=4, keep_segments=3).page()["events"]
    ]
    assert seqs == list(range(1, 12))


def test_event_log_stays_bounded_and_rewrites_only_a_small_segment(tmp_path) -> None:
    log = local_log(tmp_path, segment_events=4, keep_segments=3)
    for i in range(50):
        log.append("tick", "x", {"i": i})
    files = sorted((tmp_path / "events" / "s1").iterdir())
    assert len(files) <= 3 and all(f.suffix == ".jsonl" for f in files)
    assert all(len(f.read_text().splitlines()) <= 4 for f in files)
    kept = [
        e["seq"] for e in local_log(tmp_path, segment_events=4, keep_segments=3).page()["events"]
    ]
    assert kept == list(range(kept[0], 51)) and len(kept) >= 8  # the newest, in order
    stored = [json.loads(ln)["seq"] for f in files for ln in f.read_text().splitlines()]
    assert stored == kept


def test_pages_return_every_event_exactly_once(tmp_path) -> None:
    log = local_log(tmp_path)
    for i in range(25):
        log.append("tick", "x", {"i": i})
    seen, cursor = [], 0
    while True:
        page = log.page(after_seq=cursor, limit=7)
        seen += [e["seq"] for e in page["events"]]
        cursor = page["next"]
        if not page["has_more"]:
            break
    assert seen == list(range(1, 26))
    assert log.page(after_seq=cursor) == {
        "events": [],
        "next": 25,
        "has_more": False,
        "first_seq": 1,
        "last_seq": 25,
    }
    assert len(log.page(limit=10 * MAX_PAGE)["events"]) == 25
    assert log.page(after_seq=2**70)["events"] == []  # a cursor from another session
    later = log.page(since=log.page()["events"][9]["ts"])["events"]
    assert [e["seq"] for e in later] == [
        e["seq"] for e in log.page()["events"] if e["ts"] > log.page()["events"][9]["ts"]
    ]


def test_a_new_session_starts_a_new_log_and_removes_the_old_one(tmp_path) -> None:
    local_log(tmp_path, "old").append("deployed", "x", {})
    log = local_log(tmp_path, "new")
    assert log.page()["events"] == [] and log.next_seq == 1
    assert [p.name for p in (tmp_path / "events").iterdir()] == ["new"]


@pytest.mark.parametrize("limit", [0, -3])
def test_a_page_holds_at_least_one_event(tmp_path, limit: int) -> None:
    log = local_log(tmp_path)
    log.append("a", "x", {})
    log.append("b", "y", {})
    page = log.page(limit=limit)
    assert len(page["events"]) == 1 and page["has_more"]


def elasticity(tmp_path, **spec: object):
    """The controller's elasticity part over a recorded spec; only its checks run (no Ray)."""
    from expertmesh.actors.elastic import Elasticity
    from expertmesh.actors.state import ControllerState, DeploymentSpec, LoadStats, StateStore

    state = ControllerState(StateStore(str(tmp_path / "controller.json")), "s1")
    state.spec = DeploymentSpec(model="m", checkpoint_uri="file:///nowhere", **spec)
    return Elasticity(state, None, None, LoadStats(), settle_s=0.0, heartbeat_timeout_s=1.0)  # type: ignore[arg-type]


def test_scale_refusals_name_the_limit_and_the_number_asked(tmp_path) -> None:
    from expertmesh.platform.errors import ConfigError
    from expertmesh.types import CapacityError

    el = elasticity(tmp_path, shards=4, min_replicas=2, max_shards=8)
    cap = Capacity(in_service=4, spares=1, room={"a": 1, "b": 0}, max_shards=8)
    el.check(6, cap)  # 4 in service + 1 spare + room for 1
    el.check(2, cap)  # shrinking needs no room
    with pytest.raises(CapacityError, match=r"7 asked, but the cluster can place at most 6"):
        el.check(7, cap)
    with pytest.raises(ConfigError, match=r"9 asked, above this deployment's max_shards=8"):
        el.check(9, cap)
    with pytest.raises(ConfigError, match=r"min_replicas=2 needs at least 2 shards") as err:
        el.check(1, cap)
    assert err.value.field == "shards"
    with pytest.raises(ConfigError, match="integer >= 1"):
        el.check(0, cap)


def test_max_shards_below_the_shards_deployed_is_refused() -> None:
    from expertmesh.actors.state import DeploymentSpec
    from expertmesh.platform.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_shards: must be >= shards \(4\), got 3"):
        DeploymentSpec(model="m", checkpoint_uri="x", shards=4, max_shards=3)

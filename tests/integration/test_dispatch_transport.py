"""The Ray-actor dispatcher on its own: real shard actors, the direct channel and its fallbacks.

Every case compares an MoE layer's output through :class:`RayDispatcher` with the same layer run
in process, so a transport that lost, reordered or mixed up rows fails here.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from expertmesh.actors.channel import Endpoint
from expertmesh.actors.expert_shard import ExpertShard
from expertmesh.actors.remote_dispatch import PlacementView, RayDispatcher
from expertmesh.platform.loader import load_for_inference
from expertmesh.runtime import LocalRayOptions, free_port, init_ray
from tests.integration.helpers import tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(state_home, tmp_path_factory):
    uri = tiny_checkpoint(tmp_path_factory.mktemp("dispatch-ckpt"))
    started = init_ray(None, LocalRayOptions())
    model, _ = load_for_inference(uri)
    model.eval()
    layers = model.moe_layers()
    experts = [(layer, e) for layer in layers for e in range(model.cfg.n_experts)]
    cls = ray.remote(ExpertShard).options(num_cpus=0.25, max_concurrency=4)
    handles = {sid: cls.remote(sid, uri, experts, 1) for sid in ("a", "b")}
    ray.get([h.ping.remote() for h in handles.values()])
    yield layers, handles, experts
    for h in handles.values():
        ray.kill(h)
    if started:
        ray.shutdown()


def view_of(handles: dict, experts: list, version: int) -> PlacementView:
    return PlacementView(
        version=version, replicas={k: sorted(handles) for k in experts}, handles=dict(handles)
    )


def connected(d: RayDispatcher) -> RayDispatcher:
    ray.get(d.pending_endpoints())
    d.collect_endpoints(force=True)
    return d


def check_layer(layers, d: RayDispatcher, seed: int) -> None:
    torch.manual_seed(seed)
    for layer in layers.values():
        x_BTD = torch.randn(3, 7, layer.cfg.d_model)
        with torch.no_grad():
            want, _ = layer(x_BTD)
            got, _ = layer(x_BTD, dispatcher=d)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channel_carries_every_call(setup) -> None:
    layers, handles, experts = setup
    d = connected(RayDispatcher(view_of(handles, experts, 1)))
    check_layer(layers, d, seed=0)
    assert d.stats.calls > 0 and d.stats.channel_calls == d.stats.calls
    assert not d.stats.failed_shards


def test_ray_transport_never_opens_a_channel(setup) -> None:
    layers, handles, experts = setup
    d = RayDispatcher(view_of(handles, experts, 1), transport="ray")
    assert d.pending_endpoints() == []
    check_layer(layers, d, seed=1)
    assert d.stats.calls > 0 and d.stats.channel_calls == 0


def test_unreachable_channel_falls_back_to_ray_calls(setup) -> None:
    layers, handles, experts = setup
    d = connected(RayDispatcher(view_of(handles, experts, 1)))
    for sid in handles:  # nothing listens there: as if a firewall stood between the nodes
        d.channels.set_endpoint(sid, Endpoint("127.0.0.1", free_port(), "00" * 32))
    check_layer(layers, d, seed=2)
    assert d.stats.calls > 0 and d.stats.channel_calls == 0
    assert not d.stats.failed_shards  # no request was failed for it, not even retried
    d.update(view_of(handles, experts, 2))  # a new placement asks for the endpoints again
    connected(d)
    before = d.stats.channel_calls
    check_layer(layers, d, seed=3)
    assert d.stats.channel_calls > before


def test_bfloat16_experts_in_a_shard_equal_the_in_process_bank(tmp_path) -> None:
    """A bfloat16 checkpoint's shard keeps bfloat16 weights and runs the same kernel path as
    the in-process ExpertBank: the layer's output is bit for bit the same (float32 copies in
    the shard would skip the bfloat16 rounding of the activations and differ)."""
    uri = tiny_checkpoint(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    model, _ = load_for_inference(uri)
    layers = model.moe_layers()
    experts = [(layer, e) for layer in layers for e in range(model.cfg.n_experts)]
    shard = ray.remote(ExpertShard).options(num_cpus=0.25).remote("h", uri, experts, 1)
    try:
        d = connected(RayDispatcher(view_of({"h": shard}, experts, 1)))
        torch.manual_seed(5)
        for layer in layers.values():
            x_BTD = torch.randn(4, 9, layer.cfg.d_model).to(torch.bfloat16)
            with torch.no_grad():
                want, _ = layer(x_BTD)
                got, _ = layer(x_BTD, dispatcher=d)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, want)
        assert d.stats.channel_calls > 0
    finally:
        ray.kill(shard)


def test_dead_shard_is_retried_on_its_replica(setup) -> None:
    layers, handles, experts = setup
    d = connected(RayDispatcher(view_of(handles, experts, 1)))
    check_layer(layers, d, seed=4)  # pooled connections to both shards now exist
    pid = ray.get(handles["a"].stats.remote())["pid"]
    ray.kill(handles["a"])
    # NOTE: wait for the process itself: Ray may call the actor dead (its calls fail) while the
    # process still runs and still answers on the channel for a moment
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid), f"shard process {pid} still alive 30 s after ray.kill"
    # the dispatcher evens calls over replicas, so within a few passes it picks "a", finds
    # the connection reset, and serves those rows from "b" in the same pass
    for seed in range(5, 9):
        check_layer(layers, d, seed=seed)
    assert d.stats.failed_shards == {"a"}
    assert d.stats.retries >= 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_last_replica_that_times_out_is_waited_for(setup) -> None:
    """A shard that is the only replica and stops answering for a while (a starved or paused
    process, not a dead one) times out at the call deadline; with no other replica to take its
    work, the dispatcher sends it again and waits up to the deadline's ceiling: the layer's
    output is complete and right, where before the request failed with NoReplicaError."""
    layers, handles, experts = setup
    only_b = {"b": handles["b"]}
    d = connected(RayDispatcher(view_of(only_b, experts, 1), call_timeout_s=0.3))
    check_layer(layers, d, seed=11)  # a pooled connection exists, calls are fast
    pid = ray.get(handles["b"].stats.remote())["pid"]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            check_layer(layers, d, seed=12)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    os.kill(pid, signal.SIGSTOP)
    worker = threading.Thread(target=run)
    try:
        worker.start()
        # resume the shard only once its call has timed out (the retry then waits for it)
        deadline = time.monotonic() + 20
        while "b" not in d.stats.failed_shards and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.stats.failed_shards == {"b"}, "the paused shard's call never timed out"
        time.sleep(0.3)  # the retry is waiting on the paused shard now
    finally:
        os.kill(pid, signal.SIGCONT)
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert not errors, errors  # NoReplicaError before the change; a wrong row fails here too
    assert d.stats.retries >= 1

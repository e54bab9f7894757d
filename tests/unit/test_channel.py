"""The direct data-plane channel over real sockets on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from expertmesh.actors.channel import (
    _REQ,
    ChannelError,
    ChannelPool,
    ChannelServer,
    ConnectError,
    Endpoint,
    RemoteError,
    ShardChannel,
)
from expertmesh.actors.expert_shard import use_batch_scheduling


def expert_math(
    layer: int, x_AD: np.ndarray, experts: list[int], counts: list[int], version: int
) -> np.ndarray:
    """A stand-in for the experts whose answer depends on version, layer, expert and row."""
    if sum(counts) != x_AD.shape[0]:
        raise ValueError(f"counts {counts} do not cover {x_AD.shape[0]} rows")
    scale = np.repeat(np.asarray(experts, dtype=x_AD.dtype) + 1, counts)[:, None]
    return x_AD * scale + layer + 100 * version


@pytest.fixture
def server():
    srv = ChannelServer(expert_math, "127.0.0.1")
    yield srv
    srv.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_in_parts(server: ChannelServer, dtype) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 16)).astype(dtype)
    b = rng.standard_normal((5, 16)).astype(dtype)
    ch = ShardChannel(server.endpoint())
    try:
        # one connection serves many requests, for any model version (two during an upgrade)
        for layer, version in ((0, 0), (3, 0), (3, 7)):
            ch.send(layer, [a, b], [2, 5], [3, 5], version=version)
            y = ch.receive(5.0)
            assert y.dtype == dtype and y.shape == (8, 16)
            expected = expert_math(layer, np.concatenate([a, b]), [2, 5], [3, 5], version)
            np.testing.assert_array_equal(y, expected)
    finally:
        ch.close()


def test_large_frame_crosses_socket_buffers(server: ChannelServer) -> None:
    x = np.arange(4096 * 512, dtype=np.float32).reshape(4096, 512)  # 8 MiB each way
    ch = ShardChannel(server.endpoint())
    ch.send(1, [x], [0], [4096])
    np.testing.assert_array_equal(ch.receive(30.0), x + 1)
    ch.close()


def test_wrong_secret_is_refused(server: ChannelServer) -> None:
    ep = server.endpoint()
    forged = Endpoint(ep.host, ep.port, "00" * 32)
    with pytest.raises(ConnectError, match="refused the secret"):
        ShardChannel(forged)


def test_shard_error_comes_back_and_link_stays_usable(server: ChannelServer) -> None:
    ch = ShardChannel(server.endpoint())
    x = np.ones((4, 8), np.float32)
    ch.send(0, [x], [1], [3])  # counts do not cover the rows: the handler raises
    with pytest.raises(RemoteError, match=r"ValueError: counts \[3\] do not cover 4 rows"):
        ch.receive(5.0)
    ch.send(0, [x], [1], [4])
    np.testing.assert_array_equal(ch.receive(5.0), 2 * x)
    ch.close()


def test_slow_shard_times_out() -> None:
    release = threading.Event()

    def hung(layer, x, experts, counts, version):
        release.wait(10)
        return x

    srv = ChannelServer(hung, "127.0.0.1")
    ch = ShardChannel(srv.endpoint())
    try:
        ch.send(0, [np.ones((1, 8), np.float32)], [0], [1])
        with pytest.raises(ChannelError, match=r"no answer within 0\.20s"):
            ch.receive(0.2)
    finally:
        release.set()
        ch.close()
        srv.close()


def test_closed_server_fails_calls_and_connects(server: ChannelServer) -> None:
    ch = ShardChannel(server.endpoint())
    server.close()
    with pytest.raises(ChannelError):
        ch.send(0, [np.ones((2, 8), np.float32)], [0], [2])
        ch.receive(2.0)
    with pytest.raises(ConnectError, match="cannot connect"):
        ShardChannel(server.endpoint(), connect_timeout_s=0.5)


def test_bad_header_closes_the_connection(server: ChannelServer) -> None:
    ep = server.endpoint()
    with socket.create_connection((ep.host, ep.port), timeout=5) as s:
        s.sendall(bytes.fromhex(ep.token))
        assert s.recv(1) == b"\x01"
        s.sendall(_REQ.pack(b"XXXX", 0, 0, 1, 1, 8, 0))
        assert s.recv(64) == b""  # the server hung up without answering
    with socket.create_connection((ep.host, ep.port), timeout=5) as s:
        s.sendall(bytes.fromhex(ep.token))
        assert s.recv(1) == b"\x01"
        s.sendall(_REQ.pack(b"EMQ2", 0, 0, 1, 2**20, 2**10, 0))  # 4 GiB of rows announced
        assert s.recv(64) == b""


def test_unsupported_dtype_is_named(server: ChannelServer) -> None:
    ch = ShardChannel(server.endpoint())
    with pytest.raises(TypeError, match="float64"):
        ch.send(0, [np.ones((1, 8))], [0], [1])
    ch.close()


def test_pool_reuses_connections_and_forgets_shards(server: ChannelServer) -> None:
    pool = ChannelPool()
    assert pool.acquire("s0") is None  # endpoint not known yet: the caller uses Ray
    pool.set_endpoint("s0", server.endpoint())
    ch = pool.acquire("s0")
    assert ch is not None
    pool.release("s0", ch)
    again = pool.acquire("s0")
    assert again is ch  # the idle connection is reused
    second = pool.acquire("s0")
    assert second is not None and second is not ch  # a concurrent caller gets its own
    pool.release("s0", second)
    pool.forget("s0")
    assert second.sock.fileno() == -1  # idle connections closed with the shard
    pool.release("s0", ch)  # returned after the shard left: closed, not kept
    assert ch.sock.fileno() == -1
    assert pool.acquire("s0") is None


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_shard_threads_inherit_batch_scheduling() -> None:
    """ExpertShard puts its thread under SCHED_BATCH before it starts the channel: the threads
    that then run the handler must inherit it (they are the ones the router wakes)."""
    seen: list[int] = []

    def handler(layer, x_AD, experts, counts, version):
        seen.append(os.sched_getscheduler(0))
        return x_AD

    servers: list[ChannelServer] = []
    policy: list[str] = []

    def start() -> None:  # a thread of its own: the policy must not stick to pytest's thread
        policy.append(use_batch_scheduling())
        servers.append(ChannelServer(handler, "127.0.0.1"))

    t = threading.Thread(target=start)
    t.start()
    t.join()
    ch = ShardChannel(servers[0].endpoint())
    try:
        ch.send(0, [np.ones((2, 8), np.float32)], [0], [2])
        ch.receive(5.0)
    finally:
        ch.close()
        servers[0].close()
    assert policy == ["batch"]
    assert seen == [os.SCHED_BATCH]
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the test's own thread is untouched

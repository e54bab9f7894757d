"""Direct data plane between the router and the expert shards: framed arrays over TCP.

A Ray actor call costs 1.4-3.5 ms on the reference machine whatever it carries (task submission,
the actor's thread pool, the result through the object store), and a decode step makes one call
per (MoE layer, shard): that, not the experts' arithmetic, was most of a distributed step.
So Ray stays the control plane (discovery, placement, health, lifecycle) and the tokens travel
over a plain connection per (router thread, shard): a request frame is a header, the expert ids
and row counts, and the rows' raw bytes; the reply is a header and the output rows (or an error
message). Ray Compiled Graphs and vLLM's message queues keep tensors off the task path the same
way; a socket keeps failure handling in our hands (a dead shard is a reset connection, a hung one
a read timeout, both retried on a replica by the dispatcher).

A shard's endpoint and its 32-byte secret are handed out by a Ray call
(:meth:`ExpertShard.endpoint`), so only a process that may call the actor can connect; a wrong
secret closes the connection before any frame is read. This module does not import Ray.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
MAX_PAYLOAD_BYTES = 256 * 2**20  # a frame larger than this is a protocol error
MAX_GROUPS = 1 << 16
_ACK = b"\x01"
# NOTE: a decode step's request to one shard is ~64-128 KB, a prefill's megabytes; with Linux's
# 16 KB starting send buffer the router's send waits for that shard's thread to be scheduled
# and read before the request to the next shard can go. Set before listen/connect so that the
# TCP window scales with it; the kernel caps it at net.core.wmem_max / rmem_max.
SOCKET_BUFFER_BYTES = 1 << 20
# request: magic, model version, layer, number of (expert, count) groups, rows, cols, dtype code
_REQ = struct.Struct("<4sIIIIIB3x")
# reply: magic, status (0 ok, 1 error), rows, cols, error message length
_REP = struct.Struct("<4sB3xIII")
_REQ_MAGIC, _REP_MAGIC = b"EMQ2", b"EMR1"  # EMQ2: the request carries the version
DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_CODES = {dt: code for code, dt in DTYPES.items()}

# (layer, x_AD, experts, counts, version) -> y_AD
Handler = Callable[[int, np.ndarray, list[int], list[int], int], np.ndarray]


class ChannelError(RuntimeError):
    """The connection failed, timed out or broke the protocol: retry the work on a replica."""


class RemoteError(ChannelError):
    """The shard answered with an error (e.g. it does not hold an expert)."""


class ChannelTimeout(ChannelError):
    """The shard did not answer (or take the request) in time: slow or hung, not known dead."""


class ConnectError(ChannelError):
    """No connection could be made (nothing listens there, a firewall, a wrong secret)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    token: str  # hex


# ---------------------------------------------------------------------- framing helpers
def _recv_into(sock: socket.socket, buf: memoryview) -> bool:
    """Fill ``buf``; False if the peer closed before sending anything, ChannelError mid-frame."""
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            if got == 0:
                return False
            raise ChannelError("connection closed mid-frame")
        got += n
    return True


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    return bytes(buf) if _recv_into(sock, memoryview(buf)) else None


def _send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """``sendmsg`` with every partial send finished (one syscall in the usual case)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _as_bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


# ---------------------------------------------------------------------- shard side
class ChannelServer:
    """Accepts connections on ``host`` (an ephemeral port) and answers each request frame with
    ``handler(layer, x_AD, experts, counts, version)``; one thread per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", *, backlog: int = 64) -> None:
        self.handler = handler
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._sock = _tcp_socket(host)
        self._sock.bind((host, 0))
        self._sock.listen(backlog)
        self.host, self.port = self._sock.getsockname()[:2]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="channel")
        self._thread.start()

    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port, self._token.hex())

    def close(self) -> None:
        """Stop accepting and drop every open connection (clients see a reset and retry)."""
        self._closed.set()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in [self._sock, *conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10.0)  # the secret must come at once
            token = _recv_exact(conn, TOKEN_BYTES)
            if token is None or not hmac.compare_digest(token, self._token):
                log.warning("channel: connection with a wrong secret refused")
                return
            conn.settimeout(None)
            conn.sendall(_ACK)
            while self._serve_one(conn):
                pass
        except (OSError, ChannelError) as exc:
            if not self._closed.is_set():
                log.info("channel: connection ended (%s)", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        head = _recv_exact(conn, _REQ.size)
        if head is None:
            return False  # the client closed between frames
        magic, version, layer, n_groups, rows, cols, code = _REQ.unpack(head)
        dtype = DTYPES.get(code)
        if magic != _REQ_MAGIC or dtype is None or n_groups > MAX_GROUPS:
            raise ChannelError(f"bad request header {head!r}")
        if rows * cols * dtype.itemsize > MAX_PAYLOAD_BYTES:
            raise ChannelError(f"request of {rows}x{cols} rows exceeds {MAX_PAYLOAD_BYTES} bytes")
        groups = np.empty(2 * n_groups, dtype="<i4")
        x_AD = np.empty((rows, cols), dtype=dtype)
        if not (_recv_into(conn, _as_bytes(groups)) and _recv_into(conn, _as_bytes(x_AD))):
            raise ChannelError("connection closed mid-frame")
        experts, counts = groups[:n_groups].tolist(), groups[n_groups:].tolist()
        try:
            y_AD = np.asarray(self.handler(layer, x_AD, experts, counts, version), dtype=dtype)
            if y_AD.shape != x_AD.shape:
                raise ValueError(f"handler returned shape {y_AD.shape}, expected {x_AD.shape}")
        except Exception as exc:  # the shard's error goes back to the caller, the link stays up
            msg = f"{type(exc).__name__}: {exc}".encode()
            _send_all(conn, [_REP.pack(_REP_MAGIC, 1, 0, 0, len(msg)), msg])
            return True
        _send_all(conn, [_REP.pack(_REP_MAGIC, 0, rows, cols, 0), _as_bytes(y_AD)])
        return True


# ---------------------------------------------------------------------- router side
class ShardChannel:
    """One authenticated connection to one shard. Not thread-safe: :class:`ChannelPool` gives
    each concurrent caller its own. After any :class:`ChannelError` but :class:`RemoteError`
    the stream's state is unknown: close it."""

    def __init__(self, endpoint: Endpoint, connect_timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self.sock = _tcp_socket(endpoint.host)
        try:
            self.sock.settimeout(connect_timeout_s)
            self.sock.connect((endpoint.host, endpoint.port))
            self.sock.sendall(bytes.fromhex(endpoint.token))
            acked = _recv_exact(self.sock, 1) == _ACK
        except OSError as exc:
            self.sock.close()
            raise ConnectError(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}") from exc
        if not acked:
            self.sock.close()
            raise ConnectError(f"shard at {endpoint.host}:{endpoint.port} refused the secret")
        self._dtype: np.dtype | None = None

    def send(
        self,
        layer: int,
        parts: Sequence[np.ndarray],
        experts: list[int],
        counts: list[int],
        timeout_s: float = 2.0,
        version: int = 0,
    ) -> None:
        """Send one request: ``parts`` stacked row-wise are the rows, ``counts[i]`` of them for
        ``experts[i]`` of model ``version`` (a shard may hold experts of two versions during an
        upgrade). Returns once the bytes are with the kernel (a hung shard's full buffer
        fails after ``timeout_s``); :meth:`receive` waits for the answer."""
        dtype = parts[0].dtype
        rows, cols = sum(p.shape[0] for p in parts), parts[0].shape[1]
        if dtype not in _CODES:
            raise TypeError(f"channel carries float32 or float16 rows, not {dtype}")
        head = _REQ.pack(_REQ_MAGIC, version, layer, len(experts), rows, cols, _CODES[dtype])
        groups = np.asarray([*experts, *counts], dtype="<i4")
        try:
            self.sock.settimeout(max(timeout_s, 1e-3))
            _send_all(self.sock, [head, _as_bytes(groups), *map(_as_bytes, parts)])
        except TimeoutError as exc:
            raise ChannelTimeout(f"send not taken within {timeout_s:.2f}s") from exc
        except OSError as exc:
            raise ChannelError(f"send failed: {exc}") from exc
        self._dtype = dtype

    def receive(self, timeout_s: float) -> np.ndarray:
        """The answer to the last :meth:`send`, waiting at most ``timeout_s``."""
        try:
            self.sock.settimeout(max(timeout_s, 1e-3))
            head = _recv_exact(self.sock, _REP.size)
            if head is None:
                raise ChannelError("shard closed the connection")
            magic, status, rows, cols, msg_len = _REP.unpack(head)
            if magic != _REP_MAGIC:
                raise ChannelError(f"bad reply header {head!r}")
            if status:
                msg = _recv_exact(self.sock, msg_len) or b""
                raise RemoteError(msg.decode(errors="replace"))
            y_AD = np.empty((rows, cols), dtype=self._dtype)
            if not _recv_into(self.sock, _as_bytes(y_AD)):
                raise ChannelError("connection closed mid-frame")
            return y_AD
        except TimeoutError as exc:
            raise ChannelTimeout(f"no answer within {timeout_s:.2f}s") from exc
        except OSError as exc:
            raise ChannelError(f"receive failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


class ChannelPool:
    """Endpoints of the shards and their idle connections, shared by the router's threads."""

    def __init__(self, connect_timeout_s: float = 1.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._endpoints: dict[str, Endpoint] = {}
        self._idle: dict[str, list[ShardChannel]] = {}
        self._lock = threading.Lock()

    def known(self) -> set[str]:
        with self._lock:
            return set(self._endpoints)

    def set_endpoint(self, shard: str, endpoint: Endpoint) -> None:
        with self._lock:
            self._endpoints[shard] = endpoint

    def forget(self, shard: str) -> None:
        """Drop a shard (left the placement, or failed): close its idle connections."""
        with self._lock:
            self._endpoints.pop(shard, None)
            idle = self._idle.pop(shard, [])
        for ch in idle:
            ch.close()

    def acquire(self, shard: str) -> ShardChannel | None:
        """An idle or new connection to ``shard``; None when its endpoint is not known (yet)."""
        with self._lock:
            endpoint = self._endpoints.get(shard)
            idle = self._idle.get(shard)
            if idle:
                return idle.pop()
        if endpoint is None:
            return None
        return ShardChannel(endpoint, self.connect_timeout_s)

    def release(self, shard: str, ch: ShardChannel) -> None:
        """Return a healthy connection for reuse (closed if the shard was forgotten meanwhile)."""
        with self._lock:
            if self._endpoints.get(shard) == ch.endpoint:
                self._idle.setdefault(shard, []).append(ch)
                return
        ch.close()

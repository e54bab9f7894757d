"""A bounded client load for chaos tests: threads issuing greedy requests and checking them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_TOKENS = 8  # new tokens per load request


@dataclass
class LoadReport:
    ok: int = 0
    failed: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class SteadyLoad:
    """``clients`` threads loop over ``prompts`` until stopped or ``max_requests`` are done.

    Every completion is compared with ``expected[prompt]`` (greedy outputs of a fault-free run).
    """

    def __init__(
        self,
        generate: Callable[[str], list[int]],
        expected: dict[str, list[int]],
        *,
        clients: int = 4,
        max_requests: int = 2000,
        max_seconds: float = 120.0,
    ) -> None:
        self.generate, self.expected = generate, expected
        self.clients, self.max_requests, self.max_seconds = clients, max_requests, max_seconds
        self.report = LoadReport()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, offset: int) -> None:
        prompts = list(self.expected)
        i = offset
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.report.ok + self.report.failed >= self.max_requests:
                    return
            prompt = prompts[i % len(prompts)]
            i += 1
            t0 = time.perf_counter()
            try:
                got = self.generate(prompt)
            except Exception as exc:
                with self._lock:
                    self.report.failed += 1
                    self.report.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            with self._lock:
                self.report.ok += 1
                self.report.latencies.append(time.perf_counter() - t0)
                if got != self.expected[prompt]:
                    self.report.wrong += 1

    def __enter__(self) -> SteadyLoad:
        for c in range(self.clients):
            t = threading.Thread(target=self._run, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait_for(self, n_ok: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.report.ok < n_ok and time.monotonic() < deadline:
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def wait_replicated(
    status_fn: Callable[[], dict],
    min_replicas: int,
    timeout: float = 20.0,
    gone: Iterable[str] = (),
) -> float:
    """Seconds until every expert has ``min_replicas`` replicas on live shards (or raise).

    ``gone`` names shards just killed: ``ray.kill`` is asynchronous, so for a moment a killed
    shard still answers; its replicas must not count.
    """
    t0 = time.monotonic()
    gone = set(gone)
    while time.monotonic() - t0 < timeout:
        st = status_fn()
        live = {s["shard_id"] for s in st["shards"] if "error" not in s} - gone
        counts = [len(set(v) & live) for v in st["placement"].values()]
        if counts and min(counts) >= min_replicas:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"replication not restored within {timeout}s: {st['placement']}")


def wait_shards(status_fn: Callable[[], dict], count: int, timeout: float = 30.0) -> dict:
    """The status once ``count`` live shards serve (replacements take a few seconds to start)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = status_fn()
        if len([s for s in st["shards"] if "error" not in s]) == count:
            return st
        time.sleep(0.2)
    raise AssertionError(f"expected {count} shards within {timeout}s, have {len(st['shards'])}")


def wait_router_table(status_fn: Callable[[], dict], version: int, timeout: float = 10.0) -> None:
    """Return once the router serves on placement ``version`` or a later one.

    The controller publishes a table and returns; the router polls for it (every quarter second,
    longer on a busy machine), so until then every dispatch still goes by the old table.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        router = status_fn()["router"] or {}
        if router.get("placement_version", -1) >= version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the router has not taken placement v{version} within {timeout}s")


def wait_event(events_fn: Callable[[], list[dict]], kind: str, timeout: float = 10.0) -> dict:
    """The first event of ``kind`` (the controller logs some just after publishing a table)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for ev in events_fn():
            if ev["kind"] == kind:
                return ev
        time.sleep(0.1)
    raise AssertionError(f"no {kind!r} event within {timeout}s")


def greedy(cluster) -> Callable[[str], list[int]]:
    """The request every load client sends: greedy, MAX_TOKENS tokens, EOS ignored."""
    return lambda p: cluster.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids

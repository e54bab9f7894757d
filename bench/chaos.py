"""Chaos under load: shard kills every 10 s, then scale-out and scale-in, on local Ray.

Measures, in one run on the ``configs/tiny.yaml`` model (4 shards, 2 replicas per expert):
failed requests while a shard is killed every 10 s (target 0 of >= 1000), p99 latency during
chaos against steady state (target <= 2x), time from a kill to full replication (target <= 5 s),
time from a scale-out request to the first dispatch served by a new shard (target <= 3 s), and
scale-in time with zero failed requests. Every completion is checked against the greedy output
of a fault-free run.

    .venv/bin/python bench/chaos.py [--model expertmesh-tiny] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from machine import machine_line  # bench/ is on sys.path (the script's folder)
from serving_lib import DEMO_PROMPTS as PROMPTS
from serving_lib import GREEDY as PARAMS
from serving_lib import kill_shards, pct, replicated

import expertmesh
from expertmesh.actors import names
from expertmesh.platform.loader import resolve_model


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return pct(self.latencies, q)


async def load(
    router,
    expected: dict[str, list[int]],
    n: int,
    concurrency: int,
    phase: Phase,
    stop: threading.Event | None = None,
) -> None:
    counter = iter(range(n))

    async def client(k: int) -> None:
        for i in counter:
            if stop is not None and stop.is_set():
                return
            prompt = PROMPTS[(i + k) % len(PROMPTS)]
            t0 = time.perf_counter()
            try:
                (out,) = await router.generate.remote(prompt, PARAMS)  # n=1: one result
            except Exception as exc:  # a failed request is what this bench counts
                phase.failed += 1
                phase.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            phase.latencies.append(time.perf_counter() - t0)
            if out["token_ids"] != expected[prompt]:
                phase.wrong += 1

    await asyncio.gather(*(client(k) for k in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    print(machine_line())
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="expertmesh-tiny")
    p.add_argument("--requests", type=int, default=1000, help="requests during the kill phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--kill-every", type=float, default=10.0)
    args = p.parse_args(argv)

    uri = resolve_model(args.model).checkpoint_uri
    cluster = expertmesh.connect()
    try:
        cluster.deploy(uri, shards=4, replicas=2)
        router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        expected = {
            pr: ray.get(router.generate.remote(pr, PARAMS))[0]["token_ids"] for pr in PROMPTS
        }

        steady = Phase()
        asyncio.run(load(router, expected, 300, args.concurrency, steady))

        chaos, heal_times, stop = Phase(), [], threading.Event()
        t = threading.Thread(target=kill_shards, args=(cluster, stop, args.kill_every, heal_times))
        t.start()
        t0 = time.perf_counter()
        asyncio.run(load(router, expected, args.requests, args.concurrency, chaos))
        chaos_s = time.perf_counter() - t0
        stop.set()
        t.join()

        # scale-out: time from the request to the first call a new shard serves
        scale = Phase()
        stop_load = threading.Event()
        lt = threading.Thread(
            target=lambda: asyncio.run(
                load(router, expected, 10**6, args.concurrency, scale, stop_load)
            )
        )
        lt.start()
        time.sleep(2.0)
        # scale from a settled cluster: healed, and the warm spare pool refilled after the kills
        settle0 = time.perf_counter()
        while time.perf_counter() - settle0 < 30 and not (
            replicated(cluster, 2) and cluster.status()["spares"]
        ):
            time.sleep(0.2)
        before_st = cluster.status()
        before = {s["shard_id"] for s in before_st["shards"]}
        spares_before = before_st["spares"]
        t0, wall0 = time.perf_counter(), time.time()
        out_thread = threading.Thread(target=cluster.scale, args=(6,))
        out_thread.start()
        first_dispatch = None
        while first_dispatch is None and time.perf_counter() - t0 < 60:
            for s in cluster.status()["shards"]:
                if s["shard_id"] not in before and s.get("calls", 0) > 0:
                    first_dispatch = time.perf_counter() - t0
                    break
            time.sleep(0.02)
        out_thread.join()
        scale_out_s = time.perf_counter() - t0
        scale_events = [
            f"  +{e['ts'] - wall0:5.2f}s {e['kind']}: {e['message']}"
            for e in cluster.events(since=wall0)
        ]
        time.sleep(2.0)
        t0 = time.perf_counter()
        cluster.scale(2)
        scale_in_s = time.perf_counter() - t0
        time.sleep(2.0)
        stop_load.set()
        lt.join()
    finally:
        cluster.shutdown()

    print(
        f"\nchaos: {len(chaos.latencies) + chaos.failed} requests in {chaos_s:.0f}s, "
        f"a shard killed every {args.kill_every:.0f}s ({len(heal_times)} kills)"
    )
    print(f"  failed requests            {chaos.failed} (wrong outputs {chaos.wrong})   target 0")
    print(
        f"  p99 latency steady/chaos   {steady.p(0.99):.3f}s / {chaos.p(0.99):.3f}s = "
        f"{chaos.p(0.99) / steady.p(0.99):.2f}x   target <= 2x"
    )
    print(f"  p50 latency steady/chaos   {steady.p(0.5):.3f}s / {chaos.p(0.5):.3f}s")
    if heal_times:
        print(
            f"  kill -> full replication   median {statistics.median(heal_times):.2f}s, "
            f"max {max(heal_times):.2f}s   target <= 5s"
        )
    print(
        f"scale-out 4->6: first dispatch on a new shard after "
        f"{first_dispatch if first_dispatch is None else round(first_dispatch, 2)}s "
        f"(target <= 3s); whole scale-out {scale_out_s:.2f}s"
    )
    print(f"  warm spares at the request: {spares_before}; controller events:")
    print("\n".join(scale_events))
    print(
        f"scale-in 6->2: {scale_in_s:.2f}s; requests during scaling: {len(scale.latencies)} ok, "
        f"{scale.failed} failed, {scale.wrong} wrong"
    )
    if chaos.errors or scale.errors:
        print("errors:", (chaos.errors + scale.errors)[:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())

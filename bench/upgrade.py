"""A live upgrade under load on local Ray: the demo model to its add_expert child, and back.

Measures, in one run (4 shards, 2 replicas per expert): failed requests while the upgrade runs
(target 0 of >= 500), p99 latency of the requests that overlap the upgrade against steady state
(target <= 2x), the bytes the shards read against the full model's size, and the time from the
upgrade call to the first token of a request on the new version. Every completion is checked
against the greedy output of the old or the new version (a request runs on one version).

    .venv/bin/python bench/upgrade.py [--base expertmesh-tiny/1] [--target expertmesh-tiny/2]

Without ``--target`` the newest add_expert version of the base is the target (``make demo``
registers one).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from machine import machine_line  # bench/ is on sys.path (the script's folder)
from serving_lib import DEMO_PROMPTS as PROMPTS
from serving_lib import GREEDY as PARAMS
from serving_lib import pct

import expertmesh
from expertmesh.actors import names
from expertmesh.pipelines.demo import base_version, grown_versions
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.tracking import Tracker


@dataclass
class Req:
    prompt: str
    start: float
    end: float
    first_token: float | None
    tokens: list[int] | None
    error: str | None = None


@dataclass
class Phase:
    reqs: list[Req] = field(default_factory=list)

    def latencies(self, lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
        """Latencies of the finished requests whose run overlaps ``[lo, hi]``."""
        return sorted(
            r.end - r.start for r in self.reqs if r.tokens and r.end >= lo and r.start <= hi
        )

    @property
    def failed(self) -> list[Req]:
        return [r for r in self.reqs if r.error]


async def load(router, n: int, concurrency: int, phase: Phase, stop: threading.Event) -> None:
    """``concurrency`` closed-loop clients streaming greedy completions until ``n`` requests
    were sent or ``stop`` is set; records when each request's first token came."""
    counter = iter(range(n))

    async def client(k: int) -> None:
        for i in counter:
            if stop.is_set():
                return
            prompt = PROMPTS[(i + k) % len(PROMPTS)]
            t0, first, tokens = time.time(), None, []
            try:
                gen = router.generate_stream.options(num_returns="streaming").remote(prompt, PARAMS)
                async for ref in gen:
                    out = await ref
                    if first is None:
                        first = time.time()
                    tokens.append(out["token_id"])
            except Exception as exc:  # a failed request is what this bench counts
                phase.reqs.append(Req(prompt, t0, time.time(), first, None, repr(exc)[:200]))
                continue
            phase.reqs.append(Req(prompt, t0, time.time(), first, tokens))

    await asyncio.gather(*(client(k) for k in range(concurrency)))


def expected(router) -> dict[str, list[int]]:
    return {p: ray.get(router.generate.remote(p, PARAMS))[0]["token_ids"] for p in PROMPTS}


def default_target(base: str) -> str:
    grown = grown_versions(Tracker(), base)
    if not grown:
        raise SystemExit(f"no add_expert version of {base}: run `make demo` or pass --target")
    return f"{grown[-1].name}/{grown[-1].version}"


def upgrade_under_load(
    cluster: expertmesh.Cluster, router, target: str, args: argparse.Namespace
) -> tuple[Phase, dict, float, float]:
    """Load, then the upgrade in the middle of it; returns the load, what the upgrade did,
    and the upgrade call's start and end (wall clock)."""
    phase, stop = Phase(), threading.Event()
    lt = threading.Thread(
        target=lambda: asyncio.run(load(router, 10**6, args.concurrency, phase, stop))
    )
    lt.start()
    time.sleep(args.lead_s)
    t_call = time.time()
    out = cluster.upgrade(target)
    t_ret = time.time()
    while (
        len(phase.reqs) < args.requests or time.time() - t_ret < args.lead_s
    ) and time.time() - t_ret < 600:
        time.sleep(0.05)
    stop.set()
    lt.join()
    return phase, out["upgraded"], t_call, t_ret


def report(
    label: str,
    steady: Phase,
    phase: Phase,
    upgraded: dict,
    t_call: float,
    t_ret: float,
    events: dict[str, dict],
    old: dict[str, list[int]],
    new: dict[str, list[int]],
    model_bytes: int,
) -> None:
    switched = events["router_switched"]["ts"]
    wrong = [r for r in phase.reqs if r.tokens and r.tokens not in (old[r.prompt], new[r.prompt])]
    late_old = [
        r
        for r in phase.reqs
        if r.tokens
        and r.start > switched
        and r.tokens != new[r.prompt]
        and old[r.prompt] != new[r.prompt]
    ]
    firsts = [r.first_token for r in phase.reqs if r.start > switched and r.first_token]
    during, base = phase.latencies(t_call, t_ret), steady.latencies()
    print(f"\n{label}: {upgraded['from']} -> {upgraded['to']}, upgrade call {t_ret - t_call:.2f} s")
    print(
        f"  requests under load        {len(phase.reqs)}, failed {len(phase.failed)}, "
        f"wrong {len(wrong)}, new-version requests on the old one {len(late_old)}   target 0"
    )
    print(
        f"  p99 latency steady/during  {pct(base, 0.99):.3f}s / {pct(during, 0.99):.3f}s = "
        f"{pct(during, 0.99) / pct(base, 0.99):.2f}x ({len(during)} requests overlap the "
        f"upgrade)   target <= 2x"
    )
    print(f"  p50 latency steady/during  {pct(base, 0.5):.3f}s / {pct(during, 0.5):.3f}s")
    print(
        f"  bytes read by the shards   {upgraded['bytes_loaded']:,} in "
        f"{upgraded['files_loaded']} files = {upgraded['bytes_loaded'] / model_bytes:.1%} of the "
        f"{model_bytes:,}-byte model; old weights dropped {upgraded['dropped']}"
    )
    stages = ["experts_loaded", "router_switched", "old_version_drained", "upgrade_finished"]
    print(
        "  stages after the call      "
        + ", ".join(f"{k} +{events[k]['ts'] - t_call:.2f}s" for k in stages if k in events)
    )
    if firsts:
        print(f"  call -> first new-version token   {min(firsts) - t_call:.2f} s")
    for r in phase.failed[:3]:
        print(f"  failed: {r.error}")


def main(argv: list[str] | None = None) -> int:
    print(machine_line())
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base",
        help="registered NAME/VERSION (default: the newest expertmesh-tiny the train pipeline "
        "registered; the grown versions share the name)",
    )
    p.add_argument("--target", help="registered NAME/VERSION (default: base's add_expert child)")
    p.add_argument("--requests", type=int, default=500, help="requests under load, at least")
    p.add_argument("--steady", type=int, default=300, help="requests of the steady phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--lead-s", type=float, default=3.0, help="load before and after the call")
    p.add_argument("--no-rollback", action="store_true", help="skip the upgrade back")
    args = p.parse_args(argv)

    tracker = Tracker()
    base_v = (
        tracker.resolve_model(args.base) if args.base else base_version(tracker, "expertmesh-tiny")
    )
    if base_v is None:
        raise SystemExit("no registered expertmesh-tiny: run `make demo` or pass --base")
    base = f"{base_v.name}/{base_v.version}"
    target = args.target or default_target(base)
    cluster = expertmesh.connect()
    try:
        cluster.deploy(base, shards=4, replicas=2)
        router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        outputs = {base: expected(router)}
        steady = Phase()
        asyncio.run(load(router, args.steady, args.concurrency, steady, threading.Event()))
        runs = []
        for label, frm, to in (("upgrade", base, target), ("rollback", target, base)):
            if label == "rollback" and args.no_rollback:
                break
            phase, upgraded, t_call, t_ret = upgrade_under_load(cluster, router, to, args)
            events = {e["kind"]: e for e in cluster.events(t_call - 1e-6)}
            outputs.setdefault(to, expected(router))
            size = ckpt.read_manifest(cluster.status()["checkpoint_uri"]).nbytes
            runs.append((label, phase, upgraded, t_call, t_ret, events, frm, to, size))
    finally:
        cluster.shutdown()

    print(
        f"\nsteady state: {len(steady.reqs)} requests, {len(steady.failed)} failed, "
        f"p50 {pct(steady.latencies(), 0.5):.3f}s, p99 {pct(steady.latencies(), 0.99):.3f}s "
        f"({args.concurrency} closed-loop clients, {PARAMS['max_tokens']} tokens each)"
    )
    for label, phase, upgraded, t_call, t_ret, events, frm, to, size in runs:
        report(
            label, steady, phase, upgraded, t_call, t_ret, events, outputs[frm], outputs[to], size
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

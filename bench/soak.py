"""Soak: a mix of requests over HTTP for ``--minutes`` while a shard is killed every 30 s.

On the demo model (4 shards, 2 replicas per expert) served by a real local Ray cluster and its
HTTP API, closed-loop clients send, in turn: short greedy completions (checked against a
fault-free run), streamed completions, long completions, and completions whose client hangs up
mid-request (whole and streamed). Every ``--sample-every`` seconds the resident memory (RSS) of
every process of the cluster is sampled (router, shards, controller, API replica, Serve's
controller and proxy, raylet, GCS).

Targets: 0 failed requests; memory of every process flat after warm-up; a request whose client
hangs up stops generating within one step (the router's ``cancel_overrun_tokens`` <= 1).
Prints requests, failures, p50/p99 latency per kind and RSS at start (after warm-up) and end
per process. ``tests/chaos/test_soak.py`` runs :func:`run_soak` for half a minute.

    .venv/bin/python bench/soak.py [--minutes 10] [--model expertmesh-tiny] [--kill-every 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import psutil
from machine import machine_line  # bench/ is on sys.path (the script's folder)
from serving_lib import DEMO_PROMPTS, kill_shards, pct

MiB = 1024 * 1024
# process title (Ray sets ``ray::<actor class>``) -> what the report calls it
ROLES = {
    "RouterService": "router",
    "ExpertShard": "shard",
    "ServeController": "serve controller",
    "ProxyActor": "serve proxy",
    "ServeReplica": "api replica",
    "Controller": "controller",  # after ServeController: the first match wins
    "raylet": "raylet",
    "gcs_server": "gcs",
}


@dataclass(kw_only=True, slots=True)
class SoakConfig:
    seconds: float = 600.0  # load, after the warm-up
    warmup_s: float = 30.0  # load before the first RSS sample that counts as "start"
    clients: int = 8
    kill_every: float = 30.0
    sample_every: float = 10.0
    short_tokens: int = 16
    stream_tokens: int = 32
    long_tokens: int = 200
    hang_up_tokens: int = 400  # a hung-up request asks for this many, then its client leaves
    hang_up_after_s: float = 0.3


@dataclass
class SoakReport:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    wrong: int = 0  # short greedy completions that differ from the fault-free run
    hung_up: int = 0  # requests whose client left before the end
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t, label -> bytes)
    heal_times: list[float] = field(default_factory=list)
    router: dict = field(default_factory=dict)  # its stats once the load stopped

    @property
    def requests(self) -> int:
        return sum(map(len, self.latencies.values())) + self.hung_up + len(self.failures)

    def rss_after_warmup(self, warmup_s: float) -> tuple[dict[str, int], dict[str, int]]:
        """RSS per process at the first sample after the warm-up and at the last one."""
        later = [r for t, r in self.rss if t >= warmup_s] or [r for _, r in self.rss[-1:]]
        return later[0], later[-1]


# ------------------------------------------------------------------------------ memory
def cluster_processes() -> dict[str, psutil.Process]:
    """This driver's local Ray cluster: every process it started (GCS, raylet) and theirs
    (workers), labelled by role; shards by their pid (killed ones are replaced)."""
    out: dict[str, psutil.Process] = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = next((r for key, r in ROLES.items() if key in title), None)
        if role == "shard":
            out[f"shard pid {proc.pid}"] = proc
        elif role is not None:
            out[role if role not in out else f"{role} pid {proc.pid}"] = proc
    return out


def sample_rss() -> dict[str, int]:
    rss = {}
    for label, proc in cluster_processes().items():
        try:
            rss[label] = proc.memory_info().rss
        except psutil.Error:  # gone meanwhile (a killed shard)
            continue
    return rss


def sampler(report: SoakReport, stop: threading.Event, every: float, t0: float) -> None:
    while True:
        report.rss.append((time.monotonic() - t0, sample_rss()))
        if stop.wait(every):
            return


# ------------------------------------------------------------------------------ clients
async def short(http: httpx.AsyncClient, prompt: str, cfg: SoakConfig) -> list[int]:
    body = {"prompt": prompt, "max_tokens": cfg.short_tokens, "temperature": 0}
    resp = await http.post(
        "/v1/completions", json=body | {"ignore_eos": True, "return_token_ids": True}
    )
    resp.raise_for_status()
    return resp.json()["choices"][0]["token_ids"]


async def streamed(http: httpx.AsyncClient, prompt: str, tokens: int, events: int | None) -> None:
    """A streamed completion read to ``[DONE]`` (or, with ``events``, left after that many)."""
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        seen = 0
        async for line in resp.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return
            if "error" in json.loads(line.removeprefix("data: ")):
                raise RuntimeError(f"error event: {line[:200]}")
            seen += 1
            if events is not None and seen >= events:
                return  # leaving the block closes the connection: the client hangs up
    raise RuntimeError("the stream ended without [DONE]")


async def whole(http: httpx.AsyncClient, prompt: str, tokens: int) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True}
    (await http.post("/v1/completions", json=body)).raise_for_status()


async def hang_up(url: str, headers: dict, prompt: str, cfg: SoakConfig) -> bool:
    """A long completion whose client leaves after ``hang_up_after_s``; True if it left."""
    timeout = httpx.Timeout(30.0, read=cfg.hang_up_after_s)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as http:
        try:
            await whole(http, prompt, cfg.hang_up_tokens)
        except httpx.ReadTimeout:  # the connection closes with the client
            return True
    return False


async def clients(
    url: str,
    token: str,
    cfg: SoakConfig,
    expected: dict[str, list[int]],
    report: SoakReport,
    deadline: float,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=4 * cfg.clients)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=120.0, limits=limits
    ) as http:

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                kind = ("short", "stream", "long", "hang_up", "stream_hang_up")[i % 5]
                prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
                i += 1
                t0 = time.perf_counter()
                try:
                    if kind == "short":
                        report.wrong += await short(http, prompt, cfg) != expected[prompt]
                    elif kind == "stream":
                        await streamed(http, prompt, cfg.stream_tokens, None)
                    elif kind == "long":
                        await whole(http, prompt, cfg.long_tokens)
                    elif kind == "hang_up":
                        if await hang_up(url, headers, prompt, cfg):
                            report.hung_up += 1
                            continue
                    else:
                        await streamed(http, prompt, cfg.hang_up_tokens, 3)
                        report.hung_up += 1
                        continue
                except Exception as exc:  # a failed request is what this bench counts
                    report.failures.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
                    continue
                report.latencies[kind].append(time.perf_counter() - t0)

        await asyncio.gather(*(client(k) for k in range(cfg.clients)))


def greedy_outputs(url: str, token: str, cfg: SoakConfig) -> dict[str, list[int]]:
    """Each prompt's short greedy completion before any fault: what the soak must return."""

    async def run() -> dict[str, list[int]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0) as http:
            return {p: await short(http, p, cfg) for p in DEMO_PROMPTS}

    return asyncio.run(run())


def run_soak(cluster, url: str, token: str, cfg: SoakConfig) -> SoakReport:
    """The load, the shard killer and the RSS sampler for ``warmup_s + seconds``; returns
    once the router holds no request (what hung-up clients left has stopped), or after a
    minute of waiting for that."""
    expected = greedy_outputs(url, token, cfg)
    report, stop = SoakReport(), threading.Event()
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=sampler, args=(report, stop, cfg.sample_every, t0)),
        threading.Thread(
            target=kill_shards, args=(cluster, stop, cfg.kill_every, report.heal_times)
        ),
    ]
    for t in threads:
        t.start()
    try:
        deadline = t0 + cfg.warmup_s + cfg.seconds
        asyncio.run(clients(url, token, cfg, expected, report, deadline))
    finally:
        stop.set()
        for t in threads:
            t.join()
    # a cancel ends its caller's wait at once; the sequence leaves its slot when the step
    # that runs meanwhile ends
    wait_s = time.monotonic() + 60
    while time.monotonic() < wait_s:
        router = cluster.status()["router"]
        if router["in_flight"] == router["running"] == router["waiting"] == 0:
            break
        time.sleep(0.1)
    report.router = router
    report.rss.append((time.monotonic() - t0, sample_rss()))
    return report


# ------------------------------------------------------------------------------ report
def print_report(report: SoakReport, cfg: SoakConfig) -> None:
    print(
        f"\nsoak: {cfg.seconds / 60:.1f} min after a {cfg.warmup_s:.0f} s warm-up, "
        f"{cfg.clients} clients, a shard killed every {cfg.kill_every:.0f} s "
        f"({len(report.heal_times)} kills)"
    )
    print(
        f"  requests {report.requests}, failed {len(report.failures)} (target 0), wrong "
        f"greedy outputs {report.wrong}, clients that hung up {report.hung_up}"
    )
    every = [x for lat in report.latencies.values() for x in lat]
    print(f"  latency p50 / p99, all finished: {pct(every, 0.5):.3f} s / {pct(every, 0.99):.3f} s")
    for kind, lat in sorted(report.latencies.items()):
        print(
            f"    {kind:<8} {len(lat):6d} requests  {pct(lat, 0.5):.3f} s / {pct(lat, 0.99):.3f} s"
        )
    r = report.router
    print(
        f"  router: cancelled sequences {r.get('cancelled')}, most tokens after a cancel "
        f"{r.get('cancel_overrun_tokens')} (target <= 1), in flight at the end {r.get('in_flight')}"
    )
    if report.heal_times:
        print(
            f"  kill -> full replication: median {statistics.median(report.heal_times):.2f} s, "
            f"max {max(report.heal_times):.2f} s"
        )
    start, end = report.rss_after_warmup(cfg.warmup_s)
    print("  RSS (MiB) after warm-up -> end:")
    for label in sorted(set(start) & set(end)):
        a, b = start[label] / MiB, end[label] / MiB
        print(f"    {label:<22} {a:8.1f} -> {b:8.1f}  ({b - a:+.1f})")
    shards = lambda rss: [v / MiB for k, v in rss.items() if k.startswith("shard")]  # noqa: E731
    if shards(start) and shards(end):
        print(
            f"    {'shards (mean)':<22} {statistics.mean(shards(start)):8.1f} -> "
            f"{statistics.mean(shards(end)):8.1f}  ({len(shards(start))} then "
            f"{len(shards(end))} processes; killed ones are replaced)"
        )
    for f in report.failures[:5]:
        print(f"  failed: {f}")


def main(argv: list[str] | None = None) -> int:
    print(machine_line())
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="expertmesh-tiny", help="registry name[/version] or URI")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kill-every", type=float, default=30.0)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--json", help="also write the report (RSS samples included) here")
    args = p.parse_args(argv)
    cfg = SoakConfig(
        seconds=60 * args.minutes,
        warmup_s=args.warmup_s,
        clients=args.clients,
        kill_every=args.kill_every,
        sample_every=args.sample_every,
    )

    import secrets

    import expertmesh
    from expertmesh.runtime import free_port

    token = secrets.token_urlsafe(16)
    cluster = expertmesh.connect()
    try:
        cluster.deploy(args.model, shards=4, replicas=2)
        url = cluster.serve(port=free_port(), token=token)
        report = run_soak(cluster, url, token, cfg)
    finally:
        cluster.shutdown()
    print_report(report, cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rss": report.rss, "router": report.router}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

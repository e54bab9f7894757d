"""Serving throughput and latency: in-process engine vs distributed (4 shards) vs vLLM-CPU.

Each request is a distinct ~32-token prompt answered with exactly 64 new tokens (EOS ignored,
greedy), on the ``configs/tiny.yaml`` model. For concurrency 1, 8, 32 and 64 the same closed-loop
client (``serving_lib.run_load``) drives (a) expertmesh's engine in a process of its own (no
Ray), (b) the distributed engine (router actor + 4 expert shard actors on local Ray, tokens over
the direct channel) and (c) vLLM's OpenAI server on the same weights exported to Hugging Face
format (skipped with a message when ``.venv-vllm`` is missing: ``make vllm-env``).

``--rounds`` rounds (default 3) run every concurrency level on each engine in turn, the
engines' order rotated every round and each round on prompts of its own (the same for every
engine in that round). Only the engine being measured runs: each is started for its turn and
stopped after it (vLLM-CPU's idle server alone held a core and cut the in-process engine from
~4,200 to ~560 tokens/s at c=64). A 2-core machine's speed
drifts by tens of percent from one minute to the next, so a figure taken minutes after another
is not comparable: the ratios here are per round, side by side, and the table gives the median
round. (b') the distributed engine with every shard call a Ray actor call (``transport="ray"``;
``--skip-ray-transport`` leaves it out) runs once afterwards: it has no target.

    .venv/bin/python bench/serving.py [--model expertmesh-tiny] [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_line
from serving_lib import (
    LoadResult,
    VllmServer,
    VllmServerConfig,
    distinct_prompts,
    run_load,
    vllm_available,
)

from expertmesh.platform.engine import Engine
from expertmesh.platform.hf import export_hf
from expertmesh.platform.loader import load_for_inference, resolve_model
from expertmesh.platform.sampling import SamplingParams

MAX_TOKENS = 64
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# NOTE: a freshly started engine's background work (vLLM's worker, Ray's spare shards) settles
# for a few seconds after its warm-up
SETTLE_S = 3.0
TARGETS = (  # (concurrency, numerator, denominator, at least): the targets
    (32, "distributed", "in-process", 0.5),
    (64, "distributed", "vllm", 1.0),
)


def n_requests(concurrency: int) -> int:
    return max(2 * concurrency, 16)


class Target(Protocol):
    """One engine under test: started once, then given one load per level in every round."""

    name: str

    async def start(self) -> None: ...

    async def run(self, prompts: list[str], concurrency: int) -> LoadResult: ...

    async def stop(self) -> None: ...


class InProcess:
    """The engine in a child process of its own, which runs each load itself.

    NOTE: not in this process: the distributed engine's driver makes this process a Ray
    driver, and the threads Ray adds here took the engine's two OpenMP threads off their cores
    (c=8: 35-371 tokens/s against ~1000 alone).
    """

    name = "in-process"

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.proc: mp.process.BaseProcess | None = None

    async def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_in_process_worker, args=(self.uri, child), daemon=True)
        self.proc.start()
        child.close()

    async def run(self, prompts: list[str], concurrency: int) -> LoadResult:
        self.conn.send((prompts, concurrency))
        result = await asyncio.to_thread(self.conn.recv)
        if isinstance(result, BaseException):
            raise result
        return result

    async def stop(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(timeout=30)
            self.proc = None


def _in_process_worker(uri: str, conn: Connection) -> None:
    """Child process: load the model, then run each (prompts, concurrency) load sent."""
    torch.set_num_threads(2)
    model, tok = load_for_inference(uri)
    engine = Engine(model, tok, max_batch=64)
    waiters: dict[str, asyncio.Future[int]] = {}

    async def stepper(wake: asyncio.Event) -> None:
        while True:
            if not engine.has_work():
                wake.clear()
                await wake.wait()
                continue
            for out in engine.step():
                if out.finished:
                    waiters.pop(out.seq.request_id).set_result(len(out.seq.output_ids))
            await asyncio.sleep(0)  # let clients that finished submit their next request

    async def load(prompts: list[str], concurrency: int) -> LoadResult:
        wake = asyncio.Event()
        task = asyncio.ensure_future(stepper(wake))

        async def send(prompt: str) -> int:
            seq = engine.add(prompt, PARAMS)
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            waiters[seq.request_id] = fut
            wake.set()
            return await fut

        try:
            return await run_load(send, prompts, concurrency)
        finally:
            task.cancel()

    while (msg := conn.recv()) is not None:
        try:
            conn.send(asyncio.run(load(*msg)))
        except Exception as exc:  # the parent raises it
            conn.send(exc)


class Distributed:
    """Router actor + expert shard actors on a local Ray cluster, driven by actor calls."""

    def __init__(
        self,
        uri: str,
        *,
        shards: int,
        router_threads: int = 1,
        micro_batches: int = 1,
        transport: str = "direct",
    ) -> None:
        self.name = "distributed" if transport == "direct" else "dist-ray-calls"
        self.uri, self.shards, self.transport = uri, shards, transport
        self.router_threads, self.micro_batches = router_threads, micro_batches
        self.cluster: Any = None
        self.params = {
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "top_p": 1.0,
            "stop": (),
            "seed": None,
        }

    async def start(self) -> None:
        import ray

        import expertmesh
        from expertmesh.actors import names

        self.cluster = expertmesh.connect()
        self.cluster.deploy(
            self.uri,
            shards=self.shards,
            replicas=2,
            advanced=expertmesh.RouterTuning(
                threads=self.router_threads,
                micro_batches=self.micro_batches,
                transport=self.transport,
            ),
        )
        wait_for_spares(self.cluster)
        self.router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)

    async def run(self, prompts: list[str], concurrency: int) -> LoadResult:
        async def send(prompt: str) -> int:
            (out,) = await self.router.generate.remote(prompt, self.params)  # n=1: one result
            return out["completion_tokens"]

        return await run_load(send, prompts, concurrency)

    async def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


class Vllm:
    """vLLM's OpenAI server on the model exported to Hugging Face format."""

    name = "vllm"

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.server: VllmServer | None = None

    async def start(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="expertmesh-hf-")
        export_hf(self.uri, self.tmp.name)
        cfg = VllmServerConfig(dtype="float32", max_tokens=MAX_TOKENS)
        self.server = VllmServer(self.tmp.name, config=cfg).__enter__()
        print(f"  vLLM started in {self.server.startup_s:.0f}s", flush=True)

    async def run(self, prompts: list[str], concurrency: int) -> LoadResult:
        assert self.server is not None
        return await run_load(self.server.send, prompts, concurrency)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.aclose()
            self.server.__exit__(None, None, None)
            self.server = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def wait_for_spares(cluster: Any, timeout_s: float = 120.0) -> None:
    """Wait until the warm spare shards are up: ``deploy`` returns once the serving shards are,
    and a spare importing torch in the background takes most of a core for seconds, which would
    land inside whichever concurrency level runs first."""
    want = cluster.status()["warm_shards"]
    deadline = time.monotonic() + timeout_s
    while len(cluster.status().get("spares", [])) < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm spare shards not up after {timeout_s:.0f} s")
        time.sleep(0.25)


Rounds = dict[str, dict[int, list[LoadResult]]]  # engine -> concurrency -> one result per round


async def run_rounds(
    targets: list[Target], prompts: list[dict[int, list[str]]], levels: list[int]
) -> Rounds:
    """``len(prompts)`` rounds side by side, the engines' order rotated every round. Each
    engine runs alone: it is started, warmed up, given every level and stopped before the
    next one starts, so no idle engine takes CPU from the one being measured."""
    results: Rounds = {t.name: {c: [] for c in levels} for t in targets}
    for r, round_prompts in enumerate(prompts):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        print(f"round {r + 1}/{len(prompts)}: {', '.join(t.name for t in order)}", flush=True)
        for t in order:
            t0 = time.perf_counter()
            await t.start()
            try:
                await t.run(prompts[0][levels[0]][:4], 4)  # warm-up
                print(f"  {t.name} up and warm in {time.perf_counter() - t0:.0f} s", flush=True)
                await asyncio.sleep(SETTLE_S)
                for c in levels:
                    results[t.name][c].append(await t.run(round_prompts[c], c))
            finally:
                await t.stop()
    return results


def median_round(runs: list[LoadResult]) -> LoadResult:
    """The round with the median throughput (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[(len(runs) - 1) // 2]


def print_report(results: Rounds, levels: list[int], rounds: int) -> None:
    print(
        f"\n{MAX_TOKENS} new tokens per request, greedy, float32; median of {rounds} round(s): "
        "tokens/s and p50/p99 latency (s) of the median round"
    )
    print(f"{'engine':<14}" + "".join(f"{'c=' + str(c):>24}" for c in levels))
    for name, by_c in results.items():
        cells = []
        for c in levels:
            m = median_round(by_c[c])
            cells.append(f"{m.tokens_per_s:8.0f} {m.p50_s:6.2f}/{m.p99_s:6.2f}")
        print(f"{name:<14}" + "".join(f"{cell:>24}" for cell in cells))
    print("\ntokens/s of every round:")
    for name, by_c in results.items():
        runs = "   ".join(
            f"c={c}: " + " ".join(f"{r.tokens_per_s:.0f}" for r in by_c[c]) for c in levels
        )
        print(f"  {name:<14} {runs}")
    pairs = [("distributed", "in-process"), ("distributed", "dist-ray-calls")]
    pairs += [("distributed", "vllm"), ("in-process", "vllm")]
    print("\nratios of throughput, per round (median first):")
    for c in levels:
        cells = []
        for a, b in pairs:
            if a not in results or b not in results:
                continue
            ratios = per_round_ratios(results, c, a, b)
            listed = " ".join(f"{x:.2f}" for x in ratios)
            cells.append(f"{a}/{b} {statistics.median(ratios):.2f}x ({listed})")
        print(f"  c={c:<3} " + "   ".join(cells))
    for c, a, b, least in TARGETS:
        if c not in levels or a not in results or b not in results:
            continue
        ratios = per_round_ratios(results, c, a, b)
        met = sum(x >= least for x in ratios)
        verdict = "met" if statistics.median(ratios) >= least else "NOT met"
        print(
            f"target c={c} {a}/{b} >= {least}: median {statistics.median(ratios):.2f}x, "
            f"{met} of {len(ratios)} rounds at or above: {verdict}"
        )


def per_round_ratios(results: Rounds, c: int, a: str, b: str) -> list[float]:
    """``a``'s throughput over ``b``'s, round by round (for one-run rows: against each round)."""
    ra, rb = results[a][c], results[b][c]
    if len(rb) == 1:
        rb = rb * len(ra)
    elif len(ra) == 1:
        ra = ra * len(rb)
    return [x.tokens_per_s / y.tokens_per_s for x, y in zip(ra, rb, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="expertmesh-tiny", help="registry name[/version] or checkpoint URI"
    )
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (median reported)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--router-threads", type=int, default=1, help="torch threads of the router")
    p.add_argument("--micro-batches", type=int, default=1, help="router micro-batches per step")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-ray-transport", action="store_true", help="leave out row (b')")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(2)
    levels = [int(c) for c in args.concurrency.split(",")]
    uri = resolve_model(args.model).checkpoint_uri
    _, tok = load_for_inference(uri, with_experts=False)
    per_round = sum(n_requests(c) for c in levels)
    pool = distinct_prompts(per_round * (args.rounds + 1), tok)
    prompts: list[dict[int, list[str]]] = []
    i = 0
    for _ in range(args.rounds + 1):  # the last set is (b')'s
        prompts.append({})
        for c in levels:
            prompts[-1][c] = pool[i : i + n_requests(c)]
            i += n_requests(c)

    def distributed(transport: str) -> Distributed:
        return Distributed(
            uri,
            shards=args.shards,
            router_threads=args.router_threads,
            micro_batches=args.micro_batches,
            transport=transport,
        )

    targets: list[Target] = [InProcess(uri), distributed("direct")]
    if args.skip_vllm:
        print("(c) vLLM left out (--skip-vllm)")
    elif vllm_available():
        targets.append(Vllm(uri))
    else:
        print("(c) vLLM skipped: .venv-vllm is missing; run `make vllm-env` to include it")
    results = asyncio.run(run_rounds(targets, prompts[:-1], levels))
    if not args.skip_ray_transport:
        print("(b') distributed engine, shard calls as Ray actor calls (one round) ...")
        results |= asyncio.run(run_rounds([distributed("ray")], prompts[-1:], levels))
    print(machine_line())
    print_report(results, levels, args.rounds)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    name: {
                        str(c): [
                            {
                                "tokens_per_s": r.tokens_per_s,
                                "p50_s": r.p50_s,
                                "p99_s": r.p99_s,
                                "requests": r.requests,
                            }
                            for r in runs
                        ]
                        for c, runs in by_c.items()
                    }
                    for name, by_c in results.items()
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

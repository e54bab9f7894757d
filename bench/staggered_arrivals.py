"""Decode throughput when requests arrive one at a time: prompts as their own pass, or padded.

``bench/serving.py`` starts its clients together, so its requests move in waves and almost every
step is pure decode. Real traffic is staggered: with 64 requests of 64 tokens running, about one
finishes and one arrives every step, so nearly every step admits a prompt next to 63 decode rows.
This bench holds the in-process engine (``configs/tiny.yaml`` model, float32, 2 threads) in that
state: 64 running requests whose lengths are spread so that one ends per step, each replaced at
once by a new ~32-token prompt asking for ``--max-tokens`` tokens (greedy, EOS ignored). It times
``--steps`` steps, alternating rounds of

- ``split``: the engine's default: a step whose padding would exceed
  ``engine.PREFILL_SPLIT_ROWS`` rows runs the decode rows and the new prompts as two passes;
- ``padded``: every row padded to the longest new prompt in one pass (the split turned off),

and prints tokens/s, ms per step and the split/padded ratio per round, then the medians.

    .venv/bin/python bench/staggered_arrivals.py [--model expertmesh-tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
from machine import machine_line  # bench/ is on sys.path (the script's folder)
from serving_lib import distinct_prompts  # bench/ is on sys.path (the script's folder)

from expertmesh.platform.engine import PREFILL_SPLIT_ROWS, Engine
from expertmesh.platform.loader import load_for_inference, resolve_model
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.sampling import SamplingParams

BATCH = 64
NEVER = 1 << 62  # a split threshold no step reaches


def run(
    model: MoETransformer, tok, prompts: Iterator[str], split_rows: int, steps: int, max_tokens: int
) -> tuple[float, float, int]:
    """(tokens/s, ms per step, steps that split) over ``steps`` steps in the staggered state."""
    eng = Engine(model, tok, max_batch=BATCH, prefill_split_rows=split_rows)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(BATCH):  # lengths 1..64: one request ends per step from the start
        eng.add(next(prompts), SamplingParams(max_tokens=i + 1, ignore_eos=True))

    def step() -> int:
        outs = eng.step()
        for out in outs:
            if out.finished:
                eng.add(next(prompts), params)
        return len(outs)

    for _ in range(10):  # warm-up
        step()
    split_before = eng.split_steps
    t0 = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    wall = time.perf_counter() - t0
    return tokens / wall, 1e3 * wall / steps, eng.split_steps - split_before


def main() -> None:
    print(machine_line())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="expertmesh-tiny", help="registry name[/version] or URI")
    p.add_argument("--steps", type=int, default=120, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both modes")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per arriving request")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_for_inference(resolve_model(args.model).checkpoint_uri)
    need = BATCH + (args.rounds * 2) * (args.steps + 10) * 2 + BATCH
    prompts = iter(distinct_prompts(need, tok))
    print(
        f"in-process engine, {BATCH} running requests, one new ~32-token prompt per finished "
        f"request, {args.max_tokens} tokens each; split threshold {PREFILL_SPLIT_ROWS} padded rows"
    )
    ratios, figures = [], {"split": [], "padded": []}
    for r in range(args.rounds):
        row = {}
        for name, rows in (("split", PREFILL_SPLIT_ROWS), ("padded", NEVER)):
            tps, ms, splits = run(model, tok, prompts, rows, args.steps, args.max_tokens)
            figures[name].append(tps)
            row[name] = tps
            print(f"round {r + 1}  {name:<6} {tps:7.0f} tok/s  {ms:6.1f} ms/step  splits {splits}")
        ratios.append(row["split"] / row["padded"])
        print(f"round {r + 1}  split/padded {ratios[-1]:.2f}x")
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(
        f"median: split {med['split']:.0f} tok/s, padded {med['padded']:.0f} tok/s, "
        f"split/padded {statistics.median(ratios):.2f}x"
    )


if __name__ == "__main__":
    main()

"""Many quality runs side by side on one GPU: several seeds and MoE recipes at once.

The models and the recipe are ``bench/quality_moe_vs_dense.py``'s (``model_configs``): a dense
decoder and an MoE of 8 experts, top-2, with equal active parameters. Each run is a process of its
own. A model this small leaves a GPU idle between its kernels, so N processes share one at
nearly N times the throughput of one. Each run is :func:`expertmesh.platform.training.train`'s
loop without MLflow or checkpoints: the same seeding, the same batches in the same order, the
same AdamW, schedule and :func:`train_step`, then :func:`evaluate` on the same validation batches.

It prints MoE - dense per seed for every recipe, and writes every run to ``--out`` as JSON. This
is for exploring recipes fast; the tracked figures in docs/results.md come from
``bench/quality_moe_vs_dense.py``.

Run (a GPU machine, data prepared by ``expertmesh data prepare`` or the quality bench)::

    python bench/quality_sweep.py --device cuda --seeds 0 1 2 3 4 \\
        --recipe base:aux=0.003,z=3e-4 --recipe bias:aux=0,z=3e-4,bias=1e-3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine_line  # bench/ is on sys.path (the script's folder)

HERE = Path(__file__).resolve().parent
KEYS = {"aux": "aux_loss_weight", "z": "z_loss_weight", "bias": "balance_bias_rate"}


def _quality_bench():
    """bench/quality_moe_vs_dense.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("quality_bench", HERE / "quality_moe_vs_dense.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_recipe(text: str) -> tuple[str, dict[str, float]]:
    """``name:aux=0.003,z=3e-4,bias=0`` -> (name, {aux_loss_weight: ..., ...})."""
    name, _, body = text.partition(":")
    if not name or not body:
        raise argparse.ArgumentTypeError(f"recipe {text!r}: want name:key=value,...")
    out = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise argparse.ArgumentTypeError(
                f"recipe {text!r}: unknown key {key!r} ({sorted(KEYS)})"
            )
        out[KEYS[key]] = float(value)
    return name, out


def run_job(job: dict) -> dict:
    """Train one model (``job``: model, recipe, seed, settings) and evaluate it."""
    from expertmesh.platform.config import TrainConfig
    from expertmesh.platform.data import TokenData
    from expertmesh.platform.model import MoETransformer
    from expertmesh.platform.training import evaluate, make_optimizer, train_step

    torch.set_num_threads(1)
    qb = _quality_bench()
    cfg = qb.model_configs(
        **job["recipe_args"],
        d_model=job["d_model"],
        n_layers=job["layers"],
        expert_ff=job["expert_ff"],
    )[job["model"]]
    steps, seed = job["steps"], job["seed"]
    tc = TrainConfig(
        steps=steps,
        batch_size=job["batch"],
        seq_len=job["seq_len"],
        lr=job["lr"],
        warmup_steps=min(50, steps // 10),
        eval_batches=job["eval_batches"],
        seed=seed,
        device=job["device"],
    )
    domains = tuple(job["domains"])
    train_data = TokenData.load(job["data_dir"], domains, "train")
    val_data = TokenData.load(job["data_dir"], domains, "validation")
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # as train(): the seed, then the model, then the data generator
    model = MoETransformer(cfg).to(job["device"])
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(seed)
    busiest = 0.0
    for step in range(steps):
        batch = train_data.sample(tc.batch_size, tc.seq_len, gen)
        _, stats = train_step(model, optimizer, batch, step, tc)
    for s in stats:
        busiest = max(busiest, *s.load_fractions())
    val = evaluate(model, val_data, tc)
    return {
        **{k: job[k] for k in ("model", "recipe", "seed")},
        "val_loss": {k.removeprefix("val_loss/"): v for k, v in val.items()},
        "mean": sum(val.values()) / len(val),
        "busiest": busiest if cfg.n_experts > 1 else None,
        "seconds": time.perf_counter() - t0,
    }


def summarise(results: list[dict], recipes: list[str], seeds: list[int]) -> str:
    dense = {r["seed"]: r["mean"] for r in results if r["model"] == "dense"}
    lines = [
        f"{'recipe':<12} " + " ".join(f"{'seed ' + str(s):>9}" for s in seeds) + "      mean  wins"
    ]
    for name in recipes:
        moe = {r["seed"]: r for r in results if r["model"] == "moe" and r["recipe"] == name}
        diffs = [moe[s]["mean"] - dense[s] if s in moe and s in dense else None for s in seeds]
        got = [d for d in diffs if d is not None]
        cells = " ".join(f"{d:>+9.4f}" if d is not None else f"{'-':>9}" for d in diffs)
        mean = f"{statistics.mean(got):+.4f}" if got else "-"
        wins = f"{sum(d < 0 for d in got)}/{len(got)}"
        lines.append(f"{name:<12} {cells}  {mean:>8}  {wins:>4}")
    return "\n".join(lines)


def main() -> None:
    print(machine_line())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--recipe", type=parse_recipe, action="append", help="name:aux=..,z=..,bias=..")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--expert-ff", type=int, default=352)
    p.add_argument("--eval-batches", type=int, default=64)
    p.add_argument("--workers", type=int, default=8, help="runs at once")
    p.add_argument("--max-seconds", type=float, default=600, help="stop waiting after this")
    p.add_argument("--data-dir", default=".state/test-data")
    p.add_argument("--out", type=Path, help="write every finished run here as JSON")
    args = p.parse_args()
    recipes = args.recipe or [parse_recipe("default:aux=0.001,z=3e-4")]  # the bench's
    common = {
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "d_model": args.d_model, "layers": args.layers, "expert_ff": args.expert_ff,
        "eval_batches": args.eval_batches, "device": args.device, "data_dir": args.data_dir,
        "domains": ["shakespeare", "python"],
    }  # fmt: skip
    jobs = []  # seed by seed, so that a run cut short by --max-seconds has whole seeds
    for s in args.seeds:
        jobs.append({**common, "model": "dense", "recipe": "dense", "recipe_args": {}, "seed": s})
        jobs += [
            {**common, "model": "moe", "recipe": name, "recipe_args": kw, "seed": s}
            for name, kw in recipes
        ]
    print(f"{len(jobs)} runs on {args.device}, {args.workers} at a time: {vars(args)}", flush=True)
    results: list[dict] = []
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        pending = pool.imap_unordered(run_job, jobs)
        for _ in jobs:
            left = args.max_seconds - (time.perf_counter() - t0)
            try:
                r = pending.next(timeout=max(1.0, left))
            except mp.TimeoutError:
                print(f"stopped waiting after {args.max_seconds:.0f} s", flush=True)
                pool.terminate()
                break
            results.append(r)
            print(
                f"  {r['model']:<5} {r['recipe']:<10} seed {r['seed']}: {r['mean']:.4f}"
                f" ({r['seconds']:.0f} s)",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    print(f"\nMoE - dense, mean validation loss (nats/token), {time.perf_counter() - t0:.0f} s:")
    print(summarise(results, [name for name, _ in recipes], args.seeds))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()

"""Adding a legal expert to the demo model against fine-tuning the whole model, on real text.

Rows, each trained from the same registered base model on the same batches per seed:

- ``base``: the base model as registered (trained on shakespeare + python only);
- ``add-expert w=W``: add_expert's core (:mod:`expertmesh.platform.grow`) at leak-penalty
  weight W: one new expert per MoE layer, only it and its gate row trained, on legal text plus
  replayed base-domain text;
- ``full FT``: every parameter trained on legal text alone;
- ``full FT+replay``: every parameter trained on the same legal + replay batches.

Columns: validation loss on legal, shakespeare and python (mean over seeds, and the change
against the base), the new experts' share of base-domain tokens, trainable parameters and wall
time. The target (issue 20) is checked on the pipeline's default leak weight: legal at least
20 % below the base while shakespeare and python stay within +2 %.

    .venv/bin/python bench/add_expert.py [--model expertmesh-tiny] [--seeds 0,1,2] [--steps 300]
        [--leak-weights 0,0.5,1,4] [--no-full-ft] [--out rows.json]
    .venv/bin/python bench/add_expert.py --report a.json,b.json   # one table from earlier runs

Losses do not depend on the machine's load, so seeds (and rows) run at different times may be
merged into one table with ``--report``; each row says over how many seeds it is a mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine_line  # bench/ is on sys.path (the script's folder)

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import TrainConfig
from expertmesh.platform.data import TokenData
from expertmesh.platform.devices import resolve_device
from expertmesh.platform.grow import (
    GrowConfig,
    domain_stats,
    grow,
    new_expert_share,
    replay_batch,
    train_new_experts,
)
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import evaluate

NEW, BASE = "legal", ("shakespeare", "python")
DOMAINS = (NEW, *BASE)


def batches(data: TokenData, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [data.sample(8, seq_len, gen)[:, :-1] for _ in range(n)]


def full_finetune(
    model: MoETransformer, new: TokenData, base: TokenData, g: GrowConfig, lr: float, replay: bool
) -> None:
    """Every parameter trained on the same kind of batches add_expert sees (without replay:
    the legal rows alone)."""
    device = resolve_device(g.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(g.seed)
    model.train()
    for step in range(g.steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, g.warmup_steps))
        parts = [new.sample(g.batch_size, g.seq_len, gen)]
        if replay and g.replay_rows:
            parts.append(replay_batch(base, g.replay_rows, g.seq_len, gen))
        batch = torch.cat(parts).to(device)
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), g.grad_clip)
        opt.step()
    model.eval()


def run_seed(
    parent: MoETransformer, data_dir: str, args: argparse.Namespace, seed: int
) -> dict[str, dict[str, float]]:
    new = TokenData.load(data_dir, [NEW], "train")
    base = TokenData.load(data_dir, list(BASE), "train")
    val = TokenData.load(data_dir, list(DOMAINS), "validation")
    eval_cfg = TrainConfig(batch_size=8, seq_len=args.seq_len, eval_batches=args.eval_batches)
    base_eval = {d: batches(TokenData.load(data_dir, [d], "validation"), 2, args.seq_len, 7)
                 for d in BASE}  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    rows["base"] = evaluate(parent, val, eval_cfg) | {"seconds": time.perf_counter() - t0}
    rows["base"]["trainable"] = 0
    # GrowConfig checks the layers against the model (a clear error for a layer it lacks)
    layers = GrowConfig(layers=args.layers).grown_layers(parent.cfg)
    suffix = "" if args.layers is None else " L" + ",".join(map(str, layers))
    for w in args.leak_weights:
        g = GrowConfig(
            steps=args.steps, batch_size=args.batch_size, replay_rows=args.replay_rows,
            seq_len=args.seq_len, lr=args.lr, leak_weight=w, seed=seed, device=args.device,
        )  # fmt: skip
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        stats = domain_stats(
            parent,
            batches(new, g.stats_batches, g.seq_len, seed),
            batches(base, g.stats_batches, g.seq_len, seed + 1),
            layers,
        )
        child, added = grow(parent, layers, g.per_layer, stats)
        train_new_experts(child, added, new, base, g)
        row = evaluate(child, val, eval_cfg)
        row["seconds"] = time.perf_counter() - t0
        d, f = parent.cfg.d_model, parent.cfg.d_ff
        row["trainable"] = sum(len(es) for es in added.values()) * (3 * d * f + d)
        for dom, bs in base_eval.items():
            shares = new_expert_share(child, bs, added)
            row[f"share/{dom}"] = statistics.mean(shares.values())
            row |= {f"share/{dom}/L{layer}": v for layer, v in shares.items()}
        rows[f"add-expert w={w:g}{suffix}"] = row
        print(f"  seed {seed} add-expert w={w:g}{suffix}: {fmt(row)}", flush=True)
    g = GrowConfig(
        steps=args.steps, batch_size=args.batch_size, replay_rows=args.replay_rows,
        seq_len=args.seq_len, seed=seed, device=args.device,
    )  # fmt: skip
    for label, replay in (("full FT", False), ("full FT+replay", True)) if args.full_ft else ():
        model = copy.deepcopy(parent)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        full_finetune(model, new, base, g, args.ft_lr, replay)
        row = evaluate(model, val, eval_cfg)
        row["seconds"] = time.perf_counter() - t0
        row["trainable"] = sum(p.numel() for p in model.parameters())
        rows[label] = row
        print(f"  seed {seed} {label}: {fmt(row)}", flush=True)
    return rows


def fmt(row: dict[str, float]) -> str:
    return "  ".join(f"{d} {row[f'val_loss/{d}']:.4f}" for d in DOMAINS)


def report(per_seed: dict[int, dict[str, dict[str, float]]], default_w: float) -> None:
    """One table: every row's mean over the seeds that ran it, against the base's mean."""
    seen = dict.fromkeys(n for rows in per_seed.values() for n in rows)
    # base, then add-expert by rising leak weight, then the rest as they came (a stable sort)
    names = sorted(
        seen,
        key=lambda n: (
            (0, 0.0) if n == "base"
            else (1, float(n.split("w=")[1].split()[0]), n) if n.startswith("add-expert w=")
            else (2, 0.0)
        ),
    )  # fmt: skip
    base = {
        d: statistics.mean(rows["base"][f"val_loss/{d}"] for rows in per_seed.values())
        for d in DOMAINS
    }
    head = f"{'row':<22}" + "".join(f"{d:>22}" for d in DOMAINS)
    head += f"{'base tokens on new':>20}{'trainable':>12}{'seconds':>9}{'seeds':>8}"
    print("\nvalidation loss, mean over seeds (change against base)")
    print(head)
    print("-" * len(head))
    means: dict[str, dict[str, float]] = {}
    for name in names:
        have = {seed: rows[name] for seed, rows in sorted(per_seed.items()) if name in rows}
        keys = set.intersection(*(set(r) for r in have.values()))
        m = {k: statistics.mean(r[k] for r in have.values()) for k in keys}
        means[name] = m
        cells = ""
        for d in DOMAINS:
            v = m[f"val_loss/{d}"]
            cells += f"{v:>12.4f} ({(v / base[d] - 1) * 100:+6.1f}%)"
        share = statistics.mean([m.get(f"share/{d}", 0.0) for d in BASE])
        share_cell = f"{share:.1%}" if name.startswith("add-expert") else "-"
        seeds = ",".join(str(s) for s in have)
        print(
            f"{name:<22}{cells}{share_cell:>20}{int(m['trainable']):>12}{m['seconds']:>9.0f}"
            f"{seeds:>8}"
        )
    row = means.get(f"add-expert w={default_w:g}")
    if row is not None:
        legal = row[f"val_loss/{NEW}"] / base[NEW] - 1
        others = {d: row[f"val_loss/{d}"] / base[d] - 1 for d in BASE}
        ok = legal <= -0.20 and all(v <= 0.02 for v in others.values())
        print(
            f"\ntarget at the default leak weight {default_w:g}: legal {legal * 100:+.1f} % "
            f"(<= -20 %), "
            + ", ".join(f"{d} {v * 100:+.1f} % (<= +2 %)" for d, v in others.items())
            + f": {'met' if ok else 'MISSED'}"
        )


def load_rows(paths: list[str]) -> dict[int, dict[str, dict[str, float]]]:
    """Merge the ``--out`` files of earlier runs: per seed, the union of their rows (a later
    file's row replaces an earlier one of the same name and seed)."""
    merged: dict[int, dict[str, dict[str, float]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("seeds"), dict):
            raise SystemExit(f"{path}: not an --out file of this script (no 'seeds' object)")
        for seed, rows in data["seeds"].items():
            merged.setdefault(int(seed), {}).update(rows)
    missing = [seed for seed, rows in merged.items() if "base" not in rows]
    if missing or not merged:
        raise SystemExit(f"no base row for seed(s) {missing} in {paths}")
    return merged


def main(argv: list[str] | None = None) -> int:
    print(machine_line())
    defaults = GrowConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="expertmesh-tiny", help="registry name[/version]")
    p.add_argument("--data", default=None, help="prepared data dir (default: the model's)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=defaults.steps)
    weights = sorted({0.0, 0.5, 1.0, 4.0, defaults.leak_weight})
    p.add_argument("--leak-weights", default=",".join(f"{w:g}" for w in weights))
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--replay-rows", type=int, default=defaults.replay_rows)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--ft-lr", type=float, default=3e-4, help="full fine-tuning's learning rate")
    p.add_argument(
        "--no-full-ft", dest="full_ft", action="store_false", help="only base and add-expert rows"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="MoE layers the add-expert rows grow, e.g. 1,2,3 (default: all)",
    )
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="also write every seed's rows as JSON here")
    p.add_argument("--report", help="comma-separated --out files: print their table, train nothing")
    args = p.parse_args(argv)
    if args.report:
        report(load_rows(args.report.split(",")), defaults.leak_weight)
        return 0
    args.leak_weights = [float(x) for x in args.leak_weights.split(",")]
    args.layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    torch.set_num_threads(args.threads)
    version = Tracker().resolve_model(args.model)
    uri = ckpt.resolve(version.source)
    data_dir = args.data or version.tags.get("data_uri") or ".state/data"
    parent = ckpt.load_model(uri)[0].eval()
    print(f"base: {version.name}/{version.version} ({uri}), data {data_dir}")
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        per_seed[seed] = run_seed(parent, data_dir, args, seed)
        if args.out:  # after every seed, so a long run stopped early keeps what it finished
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps({"seeds": per_seed}, indent=2))
            tmp.replace(args.out)
    report(per_seed, defaults.leak_weight)
    return 0


if __name__ == "__main__":
    sys.exit(main())

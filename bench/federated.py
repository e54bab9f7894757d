"""Federated LoRA fine-tuning on the legal domain split by license category (issue 21).

Rows, each from the same registered base model, per seed:

- ``centralised``: LoRA on every client's data pooled in one place, at the model's top-2,
  the same number of tokens as a federation (``rounds * steps`` steps of ``clients * batch``);
- ``flame``: the federation at the clients file's budgets (1, 2 and 4), FLAME's aggregation;
- ``fedavg``: the same budgets, plain FedAvg (per-expert weight |D_i| only);
- ``fedavg k=1``: FedAvg with every client at the weakest budget.

The federated rows run the real pipeline (:func:`expertmesh.pipelines.federated.federate`) on a
local Ray cluster: one actor per client, one MLflow run per federation, a registered version.
Columns: legal validation loss at k = 2 and at each client's own k (mean over clients, with
its own output scale s_i), shakespeare and python loss at k = 2, adapter bytes sent per round
(down and up) and seconds per round; mean over seeds (± the spread where there are several).
Targets: FLAME within 5 % of centralised on legal at k = 2, and below FedAvg at k = 1.

    .venv/bin/python bench/federated.py --model expertmesh-tiny [--seeds 0,1,2] [--rounds 10]
        [--steps 20] [--clients configs/federated.yaml] [--json rows.json]
    .venv/bin/python bench/federated.py --report a.json,b.json   # one table from earlier runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from machine import machine_line  # bench/ is on sys.path (the script's folder)

from expertmesh import envs
from expertmesh.pipelines.federated import FederatedOptions, federate
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.data import TokenData
from expertmesh.platform.federated.config import find_clients_file, load_federation
from expertmesh.platform.federated.local import evaluate_at, local_train
from expertmesh.platform.federated.lora import LoRAMoE
from expertmesh.platform.federated.partition import partition_digest, write_partitions
from expertmesh.platform.federated.strategy import TrainInstruction
from expertmesh.platform.tracking import Tracker
from expertmesh.runtime import LocalRayOptions, init_ray

BASE = ("shakespeare", "python")
COLUMNS = ("legal k=2", "legal own k", "shakespeare", "python", "KB/round", "s/round")


def centralised(args, fed, parent_uri: str, parts: dict, val: TokenData, seed: int) -> dict:
    model = ckpt.load_model(parent_uri)[0]
    lora = LoRAMoE(model, fed.lora)
    streams = {
        name: TokenData.load(p.path, [p.domain], "train").stream.numpy()
        for name, p in parts.items()
    }
    # NOTE: one pooled stream: windows are drawn in proportion to each client's size, as in
    # the federation's |D_i| weighting
    data = TokenData({"legal": np.concatenate(list(streams.values()))}, val.vocab_size)
    t0 = time.perf_counter()
    instr = TrainInstruction(
        client="centralised",
        server_round=1,
        adapters=lora.adapters(),
        scale=1.0,
        k=model.cfg.top_k,
        local_steps=args.rounds * args.steps,
        lr=fed.lr,
        batch_size=fed.batch_size * len(parts),
        seq_len=fed.seq_len,
        seed=seed,
    )
    up = local_train(lora, data, instr)
    secs = (time.perf_counter() - t0) / args.rounds
    kw = {"batches": fed.eval_batches, "batch_size": fed.batch_size, "seq_len": fed.seq_len}
    m = evaluate_at(lora, val, [2], scale=up.scale, **kw)
    own = [
        evaluate_at(lora, val, [c.k], scale=up.scale, **kw)[f"val_loss/legal/k{c.k}"]
        for c in fed.clients
    ]
    return {
        "legal k=2": m["val_loss/legal/k2"],
        "legal own k": sum(own) / len(own),
        **{d: m[f"val_loss/{d}/k2"] for d in BASE if f"val_loss/{d}/k2" in m},
        "s/round": secs,  # no bytes: the data is in one place
    }


def federated_row(args, clients_file: str, strategy: str, seed: int, part_dir: str) -> dict:
    res = federate(
        FederatedOptions(
            model=args.model,
            clients=clients_file,
            rounds=args.rounds,
            local_steps=args.steps,
            strategy=strategy,
            seed=seed,
            partitions_dir=part_dir,
            register_as=f"{args.model.split('/')[0].split('@')[0]}-fed-bench",
            experiment="bench-federated",
        )
    )
    own = list(res.own_k_loss.values())
    return {
        "legal k=2": res.metrics["val_loss/legal/k2"],
        "legal own k": sum(own) / len(own),
        **{d: res.metrics[f"val_loss/{d}/k2"] for d in BASE if f"val_loss/{d}/k2" in res.metrics},
        "KB/round": res.bytes_per_round / 1024,
        "s/round": res.seconds_per_round,
    }


def fmt(values: list[float], column: str) -> str:
    """Mean (± the spread over seeds, where there are several): losses to 4 decimals, seconds to
    1, kilobytes whole."""
    places = 0 if column == "KB/round" else 1 if column == "s/round" else 4
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{places}f}"
    return f"{mean:.{places}f} ± {statistics.stdev(values):.{places}f}"


def report(rows: dict[str, list[dict]], seeds: list[int], args, fed, seconds: float) -> None:
    budgets = ", ".join(f"{c.name} k={c.k}" for c in fed.clients)
    print(machine_line())
    print(
        f"model {args.model}, {len(fed.clients)} clients ({budgets}), {args.rounds} rounds x "
        f"{args.steps} local steps, batch {fed.batch_size} x {fed.seq_len}, LoRA r={fed.lora.rank}, "
        f"FLAME t={fed.t}, seeds {seeds}, {seconds:.0f} s in all"
    )
    print("| row | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label, rs in rows.items():
        cells = [fmt([r[c] for r in rs], c) if c in rs[0] else "-" for c in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    mean = {label: statistics.fmean(r["legal k=2"] for r in rs) for label, rs in rows.items()}
    gap = mean["flame"] / mean["centralised"] - 1
    print(
        f"FLAME vs centralised (legal k=2): {gap:+.1%} (target within +5 %: "
        f"{'met' if gap <= 0.05 else 'NOT met'})"
    )
    below = mean["flame"] < mean["fedavg k=1"]
    print(f"FLAME below FedAvg at k=1: {'yes' if below else 'NO'}")
    diff = mean["flame"] / mean["fedavg"] - 1
    verdict = "beats" if diff < 0 else "does not beat"
    print(f"activation-aware aggregation {verdict} plain FedAvg here: {diff:+.2%} on legal k=2")
    per_seed = [
        rows["flame"][i]["legal k=2"] / rows["fedavg"][i]["legal k=2"] - 1
        for i in range(len(seeds))
    ]
    print("FLAME vs FedAvg per seed: " + ", ".join(f"{d:+.2%}" for d in per_seed))


def load_rows(paths: list[str]) -> tuple[dict[str, list[dict]], list[int], float]:
    """Merge the ``--json`` files of earlier runs (each a set of whole seeds) into one table."""
    rows: dict[str, list[dict]] = {}
    seeds: list[int] = []
    seconds = 0.0
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not {"seeds", "rows"} <= set(data):
            raise SystemExit(f"{path}: not a --json file of this script (no 'seeds' and 'rows')")
        dup = set(seeds) & set(data["seeds"])
        if dup:
            raise SystemExit(f"{path}: seed(s) {sorted(dup)} are already in an earlier file")
        seeds += data["seeds"]
        seconds += data.get("seconds", 0.0)
        for label, rs in data["rows"].items():
            rows.setdefault(label, []).extend(rs)
    return rows, seeds, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="expertmesh-tiny", help="registered NAME[/VERSION]")
    p.add_argument("--clients", default="configs/federated.yaml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="local steps per client per round")
    p.add_argument("--json", default=None, help="also write the raw rows here")
    p.add_argument("--report", help="comma-separated --json files: print their table, run nothing")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fed = load_federation(args.clients)
    if args.report:
        rows, done, seconds = load_rows(args.report.split(","))
        report(rows, done, args, fed, seconds)
        return 0
    tracker = Tracker()
    parent = tracker.resolve_model(args.model)
    parent_uri = ckpt.resolve(parent.source)
    data_dir = parent.tags["data_uri"]
    cache_dir = str(Path(data_dir).resolve().parent / "cache")
    digest = partition_digest(fed, data_dir)
    part_dir = str(envs.home() / "federated" / digest[:16])
    parts = write_partitions(fed, data_dir=data_dir, cache_dir=cache_dir, out_dir=part_dir)
    val = TokenData.load(data_dir, ["legal", *BASE], "validation")
    # every client at the weakest budget: the same clients file with k = 1 throughout
    raw = yaml.safe_load(find_clients_file(args.clients).read_text())
    for c in raw["clients"]:
        c["k"] = 1
    weak = Path(tempfile.mkdtemp(prefix="fed-bench-")) / "clients-k1.yaml"
    weak.write_text(yaml.safe_dump(raw))
    init_ray(None, LocalRayOptions(num_cpus=max(4, int(sum(c.num_cpus for c in fed.clients)) + 1)))
    rows: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        fed_seed = dataclasses.replace(fed, seed=seed)
        rows.setdefault("centralised", []).append(
            centralised(args, fed_seed, parent_uri, parts, val, seed)
        )
        for label, file, strategy in (
            ("flame", args.clients, "flame"),
            ("fedavg", args.clients, "fedavg"),
            ("fedavg k=1", str(weak), "fedavg"),
        ):
            rows.setdefault(label, []).append(federated_row(args, file, strategy, seed, part_dir))
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
        if args.json:  # after every seed, so a long run stopped early keeps the seeds it finished
            done = seeds[: seeds.index(seed) + 1]
            record = {"seeds": done, "rows": rows, "seconds": time.perf_counter() - t_start}
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(args.json)
    report(rows, seeds, args, fed, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the main job on the embedded defaults (local Ray, local MLflow store).

Prepares the data and trains the tiny model if the registry has none (cached afterwards),
starts the platform, deploys the model with its experts spread over shard actors, sends real
prompts from every domain, and prints the generations, which experts served which domain,
throughput, and the API address and token.

Then it grows the model by a ``legal`` expert per MoE layer (add_expert, cached like the base
model), upgrades the serving cluster to that version while prompts keep running, and prints
the legal prompts before and after with the expert-by-domain table, where the new expert
takes the legal tokens. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass

import expertmesh
from expertmesh.pipelines.train import train_lineage
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import load_config
from expertmesh.platform.data import prepare
from expertmesh.platform.grow import GrowConfig
from expertmesh.platform.tracking import ModelVersionInfo, Tracker
from expertmesh.platform.training import train
from expertmesh.runtime import free_port
from expertmesh.types import Completion

PROMPTS: dict[str, list[str]] = {
    "shakespeare": [
        "ROMEO. But soft, what light through yonder window",
        "KING HENRY. Once more unto the breach, dear friends,",
        "HAMLET. To be, or not to be, that is",
    ],
    "python": [
        "def __init__(self, name, value=None):\n    ",
        "import os\nimport sys\n\n\ndef main(",
        "    for key, value in sorted(",
    ],
    "legal": [
        "Permission is hereby granted, free of charge, to any person",
        'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND',
        "Redistribution and use in source and binary forms, with or without",
    ],
}


@dataclass(kw_only=True, slots=True)
class DemoResult:
    base: str  # the base model served first, ``name/version``
    completions: dict[str, list[Completion]]  # on the base model, per domain
    tokens_per_s: float
    api_url: str | None
    token: str | None
    grown: str | None = None  # the version with the legal expert, once served
    upgrade: UpgradeRun | None = None
    completions_after: dict[str, list[Completion]] | None = None  # on the grown version


@dataclass(kw_only=True, slots=True)
class UpgradeRun:
    """A live upgrade with prompts running through it."""

    target: str
    upgraded: dict  # what the upgrade did (Cluster.upgrade's ``"upgraded"``)
    model_bytes: int  # the target checkpoint's size, to compare the bytes loaded with
    requests: int  # requests that finished while the upgrade ran (and just after)
    failed: list[str]
    seconds: float


def base_version(tracker: Tracker, name: str) -> ModelVersionInfo | None:
    """The newest version of ``name`` that the train pipeline registered (not a fine-tune or a
    grown version: those share the name)."""
    bases = [v for v in tracker.versions(name) if v.tags.get("pipeline") == "train"]
    return bases[-1] if bases else None


def ensure_model(config: str, tracker: Tracker, overrides: list[str] | None = None) -> str:
    """The base model as ``name/version``; trains and registers it first if the registry has
    none."""
    cfg = load_config(config, overrides)
    prepare(cfg.data)
    name = cfg.train.registered_model
    mv = base_version(tracker, name)
    if mv is None:
        print(f"no registered {name!r} yet: training it (about 10 minutes on 2 cores)", flush=True)
        result = train(cfg, tracker=tracker, lineage=train_lineage(cfg))
        if result.model_version is None:
            raise RuntimeError(f"training {name} registered no version")
        mv = result.model_version
        print(f"registered {name} version {mv.version}", flush=True)
    else:
        print(f"reusing registered model {name} version {mv.version}", flush=True)
    return f"{name}/{mv.version}"


def grown_versions(
    tracker: Tracker, base: str, domain: str | None = None
) -> list[ModelVersionInfo]:
    """The versions add_expert grew from ``base`` (for ``domain``, if given), oldest first."""
    parent = tracker.resolve_model(base)
    ref = f"{parent.name}/{parent.version}"
    return [
        v
        for v in tracker.versions(parent.name)
        if (v.tags.get("pipeline"), v.tags.get("parent")) == ("add_expert", ref)
        and (domain is None or v.tags.get("domains") == domain)
    ]


def ensure_domain_expert(base: str, tracker: Tracker, domain: str, steps: int) -> str:
    """``base`` grown by one ``domain`` expert per MoE layer, as ``name/version``; runs
    add_expert first unless the registry holds such a version of ``base`` already."""
    from expertmesh.pipelines.add_expert import AddExpertOptions, add_expert

    grown = grown_versions(tracker, base, domain)
    if grown:
        v = grown[-1]
        print(f"reusing {v.name}/{v.version}: {base} + {domain} experts", flush=True)
        return f"{v.name}/{v.version}"
    print(f"adding a {domain} expert to every MoE layer of {base} ({steps} steps) ...", flush=True)
    res = add_expert(AddExpertOptions(model=base, domain=domain, grow=GrowConfig(steps=steps)))
    mv = res.model_version
    changes = ", ".join(
        f"{d} {100 * (res.val_after[f'val_loss/{d}'] / res.val_before[f'val_loss/{d}'] - 1):+.1f} %"
        for d in sorted({k.split("/", 1)[1] for k in res.val_after if k.startswith("val_loss/")})
    )
    print(f"registered {mv.name}/{mv.version} in {res.seconds:.0f} s; val loss: {changes}")
    return f"{mv.name}/{mv.version}"


def upgrade_while_serving(
    cluster: expertmesh.Cluster,
    target: str,
    prompts: list[str],
    *,
    max_tokens: int,
    clients: int = 3,
) -> UpgradeRun:
    """Upgrade ``cluster`` to ``target`` while ``clients`` callers keep sending ``prompts``."""
    stop, lock = threading.Event(), threading.Lock()
    finished: list[float] = []
    failed: list[str] = []

    def client(first: int) -> None:
        i = first
        while not stop.is_set():
            try:
                cluster.generate(prompts[i % len(prompts)], max_tokens=max_tokens)
                with lock:
                    finished.append(time.time())
            except Exception as exc:  # counted: the point is that there are none
                with lock:
                    failed.append(repr(exc))
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    while len(finished) < clients and not failed:  # the load runs before the upgrade starts
        time.sleep(0.05)
    t0 = time.time()
    out = cluster.upgrade(target)
    seconds = time.time() - t0
    after = len(finished)
    while len(finished) < after + clients and not failed:  # and goes on after it
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    size = ckpt.read_manifest(cluster.status()["checkpoint_uri"]).nbytes
    return UpgradeRun(
        target=target,
        upgraded=out["upgraded"],
        model_bytes=size,
        requests=len([f for f in finished if f >= t0]),
        failed=failed,
        seconds=seconds,
    )


def expert_table(completions: dict[str, list[Completion]]) -> str:
    """Share of each domain's routed tokens each expert served, averaged over MoE layers
    (layers may hold different numbers of experts: a missing one served nothing there)."""
    lines = []
    n_exp = max(
        len(row) for outs in completions.values() for c in outs for row in c.expert_counts or []
    )
    for domain, outs in completions.items():
        counts = [c.expert_counts for c in outs if c.expert_counts]
        n_layers = len(counts[0])
        shares = [0.0] * n_exp
        for layer in range(n_layers):
            width = len(counts[0][layer])
            row = [sum(c[layer][e] for c in counts) for e in range(width)]
            total = sum(row) or 1
            for e in range(width):
                shares[e] += row[e] / total / n_layers
        if not lines:
            lines.append(f"{'domain':<12}" + "".join(f"{'E' + str(e):>7}" for e in range(n_exp)))
        lines.append(f"{domain:<12}" + "".join(f"{s:>7.1%}" for s in shares))
    return "\n".join(lines)


def run_prompts(
    cluster: expertmesh.Cluster, max_tokens: int
) -> tuple[dict[str, list[Completion]], float]:
    """Every domain's prompts at once, with their routing; and the generated tokens/s."""
    prompts = [p for ps in PROMPTS.values() for p in ps]
    t0 = time.perf_counter()
    outs = cluster.generate(prompts, max_tokens=max_tokens, routing=True)
    elapsed = time.perf_counter() - t0
    by_domain, i = {}, 0
    for domain, ps in PROMPTS.items():
        by_domain[domain] = outs[i : i + len(ps)]
        i += len(ps)
    return by_domain, sum(c.completion_tokens for c in outs) / elapsed


def print_completions(completions: dict[str, list[Completion]], domains: list[str]) -> None:
    for domain in domains:
        for prompt, c in zip(PROMPTS[domain], completions[domain], strict=True):
            print(f"\n[{domain}] {prompt!r}\n  -> {c.text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh.pipelines.demo", description=__doc__)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override"
    )
    p.add_argument("--model", help="checkpoint URI or registry name (default: train/reuse tiny)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--expert-steps",
        type=int,
        default=GrowConfig().steps,
        help="add_expert's training steps for the legal expert (when not cached)",
    )
    p.add_argument(
        "--no-add-expert", action="store_true", help="serve the base model only (no upgrade)"
    )
    p.add_argument("--no-wait", action="store_true", help="exit after the demo instead of serving")
    return p


def run(args: argparse.Namespace) -> DemoResult:
    """The demo: serve the base model, then grow it by a legal expert and upgrade live."""
    tracker = Tracker()
    if args.model and not args.no_add_expert:
        raise SystemExit("--model serves a model of your own: pass --no-add-expert with it")
    if args.set and args.model:
        raise SystemExit("--set changes the config of the model the demo trains: not with --model")
    base = args.model or ensure_model(args.config, tracker, args.set)
    print(f"starting local Ray and deploying {base} on {args.shards} shard actors ...", flush=True)
    cluster = expertmesh.connect()
    try:
        cluster.deploy(base, shards=args.shards, replicas=args.replicas)
        url = cluster.serve(port=free_port())
        completions, tps = run_prompts(cluster, args.max_tokens)
        res = DemoResult(
            base=base,
            completions=completions,
            tokens_per_s=tps,
            api_url=url,
            token=cluster.api_token,
        )
        print_completions(completions, list(PROMPTS))
        status = cluster.status()
        print(
            f"\nexperts live in {len(status['shards'])} shard actors "
            f"({status['min_replicas']} replicas each) on {len(status['nodes'])} node(s)"
        )
        print(
            f"throughput: {tps:.0f} generated tokens/s ({sum(map(len, PROMPTS.values()))} concurrent requests)"
        )
        print("\nwhich experts served which domain (share of routed tokens, mean over MoE layers):")
        print(expert_table(completions))
        if not args.no_add_expert:
            grow_live(cluster, res, tracker, args)
        print(f"\nHTTP API: {url}   token: {res.token}")
        print(
            f"  curl -s {url}/v1/completions -H 'Authorization: Bearer {res.token}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model": "' + cluster.status()["model"] + '", "prompt": "ROMEO.", '
            '"max_tokens": 32}\''
        )
        if not args.no_wait:
            print("\nserving; press Ctrl-C to stop everything", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        print("\nstopping ...", flush=True)
        cluster.shutdown()
    return res


def grow_live(
    cluster: expertmesh.Cluster, res: DemoResult, tracker: Tracker, args: argparse.Namespace
) -> None:
    """Add the legal expert (or reuse it), upgrade to it under load, show what changed."""
    print("\n--- a new domain, live ---", flush=True)
    res.grown = ensure_domain_expert(res.base, tracker, "legal", args.expert_steps)
    prompts = [p for ps in PROMPTS.values() for p in ps]
    print(f"upgrading the serving cluster {res.base} -> {res.grown} under load ...", flush=True)
    up = upgrade_while_serving(cluster, res.grown, prompts, max_tokens=args.max_tokens)
    res.upgrade = up
    u = up.upgraded
    print(
        f"upgraded in {up.seconds:.1f} s with {up.requests} requests finished meanwhile, "
        f"{len(up.failed)} failed; shards read {u['files_loaded']} expert files "
        f"({u['bytes_loaded'] / 2**20:.1f} MiB of the {up.model_bytes / 2**20:.1f} MiB model), "
        f"dropped {u['dropped']} old expert weights"
    )
    for f in up.failed[:3]:
        print(f"  failed: {f}")
    res.completions_after, _ = run_prompts(cluster, args.max_tokens)
    for i, prompt in enumerate(PROMPTS["legal"]):
        print(f"\n[legal] {prompt!r}")
        print(f"  {res.base:>22} -> {res.completions['legal'][i].text!r}")
        print(f"  {res.grown:>22} -> {res.completions_after['legal'][i].text!r}")
    print(f"\nwhich experts serve which domain on {res.grown} (the new expert is the last):")
    print(expert_table(res.completions_after))


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

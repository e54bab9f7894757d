"""``make demo``: the main job on the embedded defaults (local Ray, local MLflow store).

Prepares the data and trains the tiny model if the registry has none (cached afterwards),
starts the platform, deploys the model with its experts spread over shard actors, sends real
prompts from every domain, and prints the generations, which experts served which domain,
throughput, and the API address and token. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass

import expertmesh
from expertmesh.platform.config import load_config
from expertmesh.platform.data import prepare
from expertmesh.platform.tracking import Tracker
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
    completions: dict[str, list[Completion]]
    tokens_per_s: float
    api_url: str | None
    token: str | None


def ensure_model(config: str, tracker: Tracker) -> str:
    """The registered model's name; trains and registers it first if the registry has none."""
    cfg = load_config(config)
    prepare(cfg.data)
    name = cfg.train.registered_model
    mv = tracker.latest_version(name)
    if mv is None:
        print(f"no registered {name!r} yet: training it (about 10 minutes on 2 cores)", flush=True)
        result = train(cfg, tracker=tracker)
        assert result.model_version is not None
        print(f"registered {name} version {result.model_version.version}", flush=True)
    else:
        print(f"reusing registered model {name} version {mv.version}", flush=True)
    return name


def expert_table(completions: dict[str, list[Completion]]) -> str:
    """Share of each domain's routed tokens each expert served, averaged over MoE layers."""
    lines = []
    for domain, outs in completions.items():
        counts = [c.expert_counts for c in outs if c.expert_counts]
        n_layers, n_exp = len(counts[0]), len(counts[0][0])
        shares = [0.0] * n_exp
        for layer in range(n_layers):
            row = [sum(c[layer][e] for c in counts) for e in range(n_exp)]
            total = sum(row) or 1
            for e in range(n_exp):
                shares[e] += row[e] / total / n_layers
        if not lines:
            lines.append(f"{'domain':<12}" + "".join(f"{'E' + str(e):>7}" for e in range(n_exp)))
        lines.append(f"{domain:<12}" + "".join(f"{s:>7.1%}" for s in shares))
    return "\n".join(lines)


def run_demo(
    model: str, *, shards: int = 4, replicas: int = 2, max_tokens: int = 48, serve: bool = True
) -> tuple[expertmesh.Cluster, DemoResult]:
    """Deploy ``model`` on a local cluster and run every domain's prompts through it."""
    cluster = expertmesh.connect()
    cluster.deploy(model, shards=shards, replicas=replicas)
    url = cluster.serve(port=free_port()) if serve else None
    prompts = [p for ps in PROMPTS.values() for p in ps]
    t0 = time.perf_counter()
    outs = cluster.generate(prompts, max_tokens=max_tokens, routing=True)
    elapsed = time.perf_counter() - t0
    by_domain, i = {}, 0
    for domain, ps in PROMPTS.items():
        by_domain[domain] = outs[i : i + len(ps)]
        i += len(ps)
    n_tok = sum(c.completion_tokens for c in outs)
    token = cluster.api_token
    return cluster, DemoResult(
        completions=by_domain, tokens_per_s=n_tok / elapsed, api_url=url, token=token
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expertmesh.pipelines.demo", description=__doc__)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--model", help="checkpoint URI or registry name (default: train/reuse tiny)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--no-wait", action="store_true", help="exit after the demo instead of serving")
    args = p.parse_args(argv)

    model = args.model or ensure_model(args.config, Tracker())
    print(f"starting local Ray and deploying {model} on {args.shards} shard actors ...", flush=True)
    cluster, res = run_demo(
        model, shards=args.shards, replicas=args.replicas, max_tokens=args.max_tokens
    )
    try:
        for domain, outs in res.completions.items():
            for prompt, c in zip(PROMPTS[domain], outs, strict=True):
                print(f"\n[{domain}] {prompt!r}\n  -> {c.text!r}")
        status = cluster.status()
        print(
            f"\nexperts live in {len(status['shards'])} shard actors "
            f"({status['min_replicas']} replicas each) on {len(status['nodes'])} node(s)"
        )
        print(f"throughput: {res.tokens_per_s:.0f} generated tokens/s (9 concurrent requests)")
        print("\nwhich experts served which domain (share of routed tokens, mean over MoE layers):")
        print(expert_table(res.completions))
        print(f"\nHTTP API: {res.api_url}   token: {res.token}")
        print(
            f"  curl -s {res.api_url}/v1/completions -H 'Authorization: Bearer {res.token}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model": "' + status["model"] + '", "prompt": "ROMEO.", "max_tokens": 32}\''
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: prepare data, train the tiny model once (cached in the MLflow registry), then
generate from prompts of every domain and show which experts served which domain."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from expertmesh.platform.config import load_config
from expertmesh.platform.data import prepare
from expertmesh.platform.engine import Engine
from expertmesh.platform.models import load_for_inference, resolve_model
from expertmesh.platform.sampling import SamplingParams
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import train

PROMPTS: dict[str, list[str]] = {
    "shakespeare": ["ROMEO. What light through yonder", "KING. My lords, we are"],
    "python": ["def __init__(self, name):\n    ", "import os\nimport sys\n\n\ndef main("],
    "legal": ["Permission is hereby granted, free of charge,", "THE SOFTWARE IS PROVIDED"],
}


def ensure_model(config: str, tracker: Tracker) -> str:
    """The registered model's name; trains and registers it first if the registry has none."""
    cfg = load_config(config)
    prepare(cfg.data)
    name = cfg.train.registered_model
    mv = tracker.latest_version(name)
    if mv is None:
        print(f"no registered {name!r} yet: training it (about 10 minutes on 2 cores)")
        train(cfg, tracker=tracker)
    else:
        print(f"reusing registered model {name} version {mv.version}")
    return name


def expert_table(seqs_by_domain: dict[str, list]) -> str:
    """Share of each domain's tokens each expert served, averaged over MoE layers."""
    rows = []
    header = None
    for domain, seqs in seqs_by_domain.items():
        counts_LE = torch.stack([s.expert_counts for s in seqs]).sum(0).float()
        frac_E = (counts_LE / counts_LE.sum(-1, keepdim=True)).mean(0)
        if header is None:
            header = f"{'domain':<12}" + "".join(f"{'E' + str(e):>7}" for e in range(len(frac_E)))
        rows.append(f"{domain:<12}" + "".join(f"{f:>7.1%}" for f in frac_E.tolist()))
    return "\n".join([header or "", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expertmesh.pipelines.demo", description=__doc__)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args(argv)
    tracker = Tracker()
    name = ensure_model(args.config, tracker)
    resolved = resolve_model(name, tracker)
    model, tokenizer = load_for_inference(resolved.checkpoint_uri)
    engine = Engine(model, tokenizer, track_routing=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    seqs = {d: [engine.add(q, params) for q in qs] for d, qs in PROMPTS.items()}
    while engine.has_work():
        engine.step()
    elapsed = time.perf_counter() - t0
    for domain, ss in seqs.items():
        for s in ss:
            print(f"\n[{domain}] {tokenizer.decode(s.prompt_ids)!r}\n  -> {s.text!r}")
    n_tok = sum(len(s.output_ids) for ss in seqs.values() for s in ss)
    print(f"\n{n_tok} tokens in {elapsed:.2f}s ({n_tok / elapsed:.0f} tokens/s, in-process engine)")
    print("\nexpert load by domain (share of routed tokens, mean over MoE layers):")
    print(expert_table(seqs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

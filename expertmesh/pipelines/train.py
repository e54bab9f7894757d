"""Train an MoE LM: ``python -m expertmesh.pipelines.train --config configs/tiny.yaml``.

Prepares the data if needed, trains with checkpoints and exact resume, logs to MLflow and
registers the result as a new model version.
"""

from __future__ import annotations

import argparse
import sys

from expertmesh.platform.config import load_config
from expertmesh.platform.data import prepare
from expertmesh.platform.training import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh.pipelines.train", description=__doc__)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML experiment config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    prepare(cfg.data, progress=not args.no_progress)
    result = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    mv = result.model_version
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"mlflow run: {result.run_id}")
    for k in sorted(result.metrics):
        if k.startswith("val_loss/") or k == "ce_loss":
            print(f"{k}: {result.metrics[k]:.4f}")
    if mv:
        print(f"registered: {mv.name} version {mv.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train an MoE LM: ``python -m expertmesh.pipelines.train --config configs/tiny.yaml``.

Prepares the data if needed, trains with checkpoints and exact resume, logs to MLflow and
registers the result as a new model version with its lineage. Checkpoints and the MLflow store
are the cluster's when it runs on one (see :mod:`expertmesh.platform.storage`). Without
``--workers`` it trains in this process; with ``--workers N`` on Ray Train
(:mod:`expertmesh.pipelines.train_ray`), joining the cluster at ``RAY_ADDRESS`` (as a Ray job
does) or starting a local one.
"""

from __future__ import annotations

import argparse
import os
import sys

from expertmesh.pipelines.train_ray import (
    RayTrainOptions,
    add_ray_train_flags,
    ray_train_options,
    train_on_ray,
)
from expertmesh.platform import data_share, lineage, storage
from expertmesh.platform.config import ExperimentConfig, load_config, to_dict
from expertmesh.platform.data import prepare
from expertmesh.platform.tracking import Tracker
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
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if checkpoints exist (a Ray Train run always starts in a new folder)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the cluster's)")
    p.add_argument(
        "--checkpoint-root", default=None, help="pyarrow.fs URI (default: the cluster's)"
    )
    add_ray_train_flags(p)
    return p


def ray_options(args: argparse.Namespace) -> RayTrainOptions | None:
    """The Ray Train options the flags ask for; None (train in this process) without --workers."""
    return ray_train_options(args, build_parser())


def data_location(cfg: ExperimentConfig, output_dir: str) -> str:
    """Where later pipelines find this run's prepared data (its versions' ``data_uri``).

    ``data.publish_uri`` if set; else, when the checkpoints go where other machines read them
    (an object store), a copy beside them (``<output_dir>/data/<digest>``), since the folder
    prepared in a job's pod goes with the pod; else the folder itself.
    """
    if cfg.data.publish_uri:
        return data_share.publish(cfg.data.data_dir, cfg.data.publish_uri)
    if storage.local_path_of(output_dir) is None:
        uri = data_share.published_uri(output_dir, cfg.data.data_dir)
        return data_share.publish(cfg.data.data_dir, uri)
    return os.path.abspath(cfg.data.data_dir)


def train_lineage(cfg: ExperimentConfig, data_uri: str | None = None) -> lineage.Lineage:
    """What a base model's registered version records: its data (``data_uri``: by default
    the prepared folder), config and code."""
    domains = list(cfg.data.train_domains)
    return lineage.Lineage(
        pipeline="train",
        parent="",
        trained_parts="all",
        domains=domains,
        data_digest=lineage.data_digest(cfg.data.data_dir, domains),
        config_digest=lineage.digest(to_dict(cfg)),
        ray_job_id=lineage.ray_job_id(),
        git_revision=lineage.git_revision(),
        data_uri=data_uri or os.path.abspath(cfg.data.data_dir),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    opts = ray_options(args)
    tracker = Tracker(args.tracking_uri)
    tracker.check_reachable()  # before hours of data preparation and training
    if cfg.train.output_dir is None:
        root = storage.checkpoint_root(args.checkpoint_root)
        cfg.train.output_dir = f"{root}/{cfg.train.registered_model}/train"
    prepare(cfg.data, progress=not args.no_progress)
    record = train_lineage(cfg, data_location(cfg, cfg.train.output_dir))
    if opts is None:
        result = train(
            cfg,
            tracker=tracker,
            resume=not args.no_resume,
            progress=not args.no_progress,
            lineage=record,
        )
    else:
        result = train_on_ray(cfg, opts, tracker=tracker, version_tags=record.tags())
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

"""Fine-tune chosen parts of a registered model; register the result as a new version.

    python -m expertmesh.pipelines.finetune --model NAME[/VERSION] \\
        (--domains D,... | --data DIR) --train router|dense|experts:L:E,...|all --steps N \\
        [--workers N [--gpus-per-worker G]]

Without ``--workers`` it trains in this process; with ``--workers N`` on Ray Train, N DDP
workers each starting from the parent with the same parts frozen.

Everything ``--train`` leaves out is frozen, and verified unchanged bit for bit in the new
checkpoint, which references the parent's unchanged files instead of copying them (router-only
fine-tuning writes one new dense file). The version carries its lineage (parent, parts, data,
config, Ray job, git revision). Every input is checked before anything is written; a bad one is
a :class:`ConfigError` naming it, and nothing half-written is ever registered.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh.pipelines.train_ray import (
    RayTrainOptions,
    add_ray_train_flags,
    ray_train_options,
    train_on_ray,
)
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import lineage, storage
from expertmesh.platform.config import (
    DataConfig,
    ExperimentConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from expertmesh.platform.data import DOMAINS, read_manifest
from expertmesh.platform.data_share import stage
from expertmesh.platform.errors import ConfigError, DataError
from expertmesh.platform.parts import Freezer, TrainedParts, parse_trained_parts, verify_frozen
from expertmesh.platform.tracking import ModelVersionInfo, Tracker
from expertmesh.platform.training import register_checkpoint, train


@dataclass(kw_only=True, slots=True)
class FinetuneOptions:
    model: str  # registry name[/version] or name@alias
    train: str  # parts, in --train syntax
    steps: int
    domains: list[str] | None = None  # default: every domain of the data
    data: str | None = None  # prepared data dir; default: the parent's training data
    ray: RayTrainOptions | None = None  # None: train in this process
    register_as: str | None = None  # default: a new version of the parent's model
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    overrides: list[str] = field(default_factory=list)  # train.KEY=VALUE
    experiment: str = "expertmesh"
    tracking_uri: str | None = None
    checkpoint_root: str | None = None
    progress: bool = False


@dataclass(kw_only=True, slots=True)
class FinetuneResult:
    model_version: ModelVersionInfo
    checkpoint_uri: str
    run_id: str
    parts: TrainedParts
    metrics: dict[str, float]


def _data(opts: FinetuneOptions, parent: ModelVersionInfo) -> tuple[str, str, list[str]]:
    """The local data folder, the ``data_uri`` to record, and the domains to train on."""
    ref = opts.data or parent.tags.get("data_uri")
    if not ref:
        raise ConfigError(
            "data", f"{parent.name}/{parent.version} records no training data; pass --data DIR"
        )
    try:
        data_dir, data_uri = stage(ref)
        prepared = read_manifest(data_dir)
    except DataError as exc:
        raise ConfigError("data", str(exc)) from None
    have = sorted(prepared.get("splits", {}).get("train", {}))
    domains = opts.domains or have
    for domain in domains:
        if domain not in DOMAINS:
            raise ConfigError("domains", f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        if domain not in have:
            raise ConfigError(
                "domains", f"domain {domain!r} is not prepared in {data_dir} (it has {have})"
            )
    return data_dir, data_uri, list(domains)


def check_tokenizer(data_dir: str, manifest: ckpt.Manifest, parent: str) -> None:
    entry = manifest.files.get(manifest.tokenizer or "")
    if entry is None:
        return
    data_tok = Path(data_dir) / "tokenizer.json"
    if hashlib.sha256(data_tok.read_bytes()).hexdigest() != entry.sha256:
        raise ConfigError(
            "data", f"{data_dir} was tokenized with another tokenizer than {parent} was trained on"
        )


def _train_config(opts: FinetuneOptions, name: str, output_dir: str) -> TrainConfig:
    values: dict[str, object] = {
        "steps": opts.steps,
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "lr": opts.lr,
        "warmup_steps": min(10, opts.steps // 10),
        "eval_every": opts.steps,
        "eval_batches": 2,
        "checkpoint_every": opts.steps,
        "log_every": max(1, opts.steps // 10),
        "output_dir": output_dir,
        "experiment": opts.experiment,
        "registered_model": name,
    }
    for item in opts.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("train."):
            raise ConfigError(item, "override must look like train.key=value, e.g. train.lr=1e-4")
        import yaml

        values[key.removeprefix("train.")] = yaml.safe_load(value)
    return from_dict(TrainConfig, values, where="train.")


def finetune(opts: FinetuneOptions) -> FinetuneResult:
    """Check every input, train the chosen parts, verify the frozen ones, register the result."""
    if isinstance(opts.steps, bool) or not isinstance(opts.steps, int) or opts.steps < 1:
        raise ConfigError("steps", f"must be a positive integer, got {opts.steps!r}")
    tracker = Tracker(opts.tracking_uri)
    tracker.check_reachable()
    try:
        parent = tracker.resolve_model(opts.model)
    except LookupError as exc:
        raise ConfigError("model", str(exc.args[0])) from None
    parent_ref = f"{parent.name}/{parent.version}"
    parent_uri = ckpt.resolve(parent.source)
    manifest = ckpt.read_manifest(parent_uri)
    parts = parse_trained_parts(opts.train, manifest.config, field="train")
    data_dir, data_uri, domains = _data(opts, parent)
    check_tokenizer(data_dir, manifest, parent_ref)
    name = opts.register_as or parent.name
    root = storage.checkpoint_root(opts.checkpoint_root)
    output_dir = f"{root}/{name}/finetune-{uuid.uuid4().hex[:12]}"
    cfg = ExperimentConfig(
        model=manifest.config,
        data=DataConfig(data_dir=data_dir, train_domains=tuple(domains)),
        train=_train_config(opts, name, output_dir),
    )
    record = lineage.Lineage(
        pipeline="finetune",
        parent=parent_ref,
        trained_parts=parts.describe(),
        domains=domains,
        data_digest=lineage.data_digest(data_dir, domains),
        config_digest=lineage.digest(
            {"model": to_dict(cfg.model), "train": to_dict(cfg.train), "parts": parts.describe()}
        ),
        ray_job_id=lineage.ray_job_id(),
        git_revision=lineage.git_revision(),
        data_uri=data_uri,
    )
    # NOTE: the pipeline's run holds the lineage; the training loop is its nested child run
    with tracker.run(opts.experiment, run_name="finetune") as run_id:
        tracker.log_params({"parent": parent_ref, "parent_checkpoint": parent_uri} | record.tags())
        if opts.ray is None:
            result = train(
                cfg,
                tracker=tracker,
                resume=False,
                progress=opts.progress,
                register=False,
                model_factory=lambda: ckpt.load_model(parent_uri)[0],
                freeze=Freezer(parts),
                parent_checkpoint=parent_uri,
                lineage=record,
            )
        else:
            ray_opts = dataclasses.replace(opts.ray, checkpoint_root=output_dir)
            result = train_on_ray(
                cfg,
                ray_opts,
                tracker=tracker,
                register=False,
                parent_checkpoint=parent_uri,
                trained_parts=parts,
                lineage=record,
            )
        verify_frozen(parent_uri, result.checkpoint_uri, parts)
        mv = register_checkpoint(
            tracker,
            name,
            source=result.checkpoint_uri,
            run_id=run_id,
            tags=record.tags() | {"n_experts": str(manifest.config.n_experts)},
        )
        tracker.set_tags({"registered_version": mv.version, "train_run_id": result.run_id})
    return FinetuneResult(
        model_version=mv,
        checkpoint_uri=result.checkpoint_uri,
        run_id=run_id,
        parts=parts,
        metrics=result.metrics,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="expertmesh.pipelines.finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registered NAME[/VERSION] or NAME@ALIAS")
    p.add_argument("--domains", default=None, help="comma-separated domains (default: all)")
    p.add_argument("--data", default=None, help="prepared data dir (default: the parent's)")
    p.add_argument(
        "--train", required=True, help="router | dense | experts:L:E,... | all (comma-separated)"
    )
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--register-as", default=None, help="registered model name (default: parent's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE")
    p.add_argument("--experiment", default="expertmesh")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the cluster's)")
    p.add_argument(
        "--checkpoint-root", default=None, help="pyarrow.fs URI (default: the cluster's)"
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    add_ray_train_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ray_opts = ray_train_options(args, parser)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = FinetuneOptions(
        model=args.model,
        train=args.train,
        steps=args.steps,
        domains=[d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None,
        data=args.data,
        ray=ray_opts,
        register_as=args.register_as,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        overrides=args.set,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        checkpoint_root=args.checkpoint_root,
        progress=args.progress,
    )
    try:
        result = finetune(opts)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mv = result.model_version
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"mlflow run: {result.run_id}")
    print(f"trained: {result.parts.describe()} (the rest verified unchanged)")
    print(f"registered: {mv.name} version {mv.version} (parent {mv.tags['parent']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

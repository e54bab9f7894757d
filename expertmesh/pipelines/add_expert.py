"""Add a domain expert to a registered model; register the grown model as a new version.

    python -m expertmesh.pipelines.add_expert --model NAME[/VERSION] --domain legal \\
        [--per-layer 1] [--layers all|0,2] --steps N [--leak-weight W] [--replay-rows R]

Each chosen MoE layer gets ``--per-layer`` new experts (see :mod:`expertmesh.platform.grow`):
copies of the expert the new domain picks most, gate rows from the domain's hidden-state
prototype. Only they train, on the new domain plus replayed base-domain text, with a penalty
on the new experts' router probability for base-domain tokens (``--leak-weight``). Everything
else is verified unchanged bit for bit; the checkpoint references the parent's unchanged files
and writes only the new experts and the dense part (whose gates grew). The version's lineage
names the parent, the added (layer, expert)s, the domain and the data.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass

import torch

from expertmesh.pipelines.finetune import check_tokenizer
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import lineage, storage
from expertmesh.platform.config import TrainConfig, to_dict
from expertmesh.platform.data import DOMAINS, TokenData, read_manifest
from expertmesh.platform.data_share import stage
from expertmesh.platform.devices import resolve_device
from expertmesh.platform.errors import ConfigError, DataError
from expertmesh.platform.grow import (
    GrowConfig,
    domain_stats,
    grow,
    new_expert_share,
    train_new_experts,
    verify_unchanged,
)
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.tracking import ModelVersionInfo, Tracker
from expertmesh.platform.training import evaluate, register_checkpoint

EVAL_BATCHES = 8


@dataclass(kw_only=True, slots=True)
class AddExpertOptions:
    model: str  # registry name[/version] or name@alias
    domain: str
    grow: GrowConfig
    data: str | None = None  # prepared data dir; default: the parent's training data
    base_domains: list[str] | None = None  # default: the parent's training domains
    register_as: str | None = None
    experiment: str = "expertmesh"
    tracking_uri: str | None = None
    checkpoint_root: str | None = None
    log_every: int = 10


@dataclass(kw_only=True, slots=True)
class AddExpertResult:
    model_version: ModelVersionInfo
    checkpoint_uri: str
    run_id: str
    added: dict[int, list[int]]
    val_before: dict[str, float]
    val_after: dict[str, float]
    # per domain, per grown layer: share of tokens whose top-k includes a new expert
    new_expert_share: dict[str, dict[int, float]]
    seconds: float


def _domains(opts: AddExpertOptions, parent: ModelVersionInfo) -> tuple[str, str, list[str]]:
    """The local data folder, the ``data_uri`` to record, and the base domains to replay."""
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
    splits = prepared.get("splits", {})
    have = sorted(set(splits.get("train", {})) & set(splits.get("validation", {})))
    if opts.domain not in DOMAINS:
        raise ConfigError("domain", f"unknown domain {opts.domain!r}; known: {', '.join(DOMAINS)}")
    base = opts.base_domains or [d for d in parent.tags.get("domains", "").split(",") if d]
    if not base:
        raise ConfigError("base_domains", "the parent records no training domains; name them")
    if opts.domain in base:
        raise ConfigError(
            "domain", f"{opts.domain!r} is one of the base domains {base}: add a new domain"
        )
    for field_name, names in (("domain", [opts.domain]), ("base_domains", base)):
        for d in names:
            if d not in have:
                raise ConfigError(field_name, f"domain {d!r} is not prepared in {data_dir}")
    return data_dir, data_uri, base


def _batches(data: TokenData, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [data.sample(8, seq_len, gen)[:, :-1] for _ in range(n)]


def add_expert(opts: AddExpertOptions) -> AddExpertResult:
    """Check every input, grow and train the model, verify it, register the result."""
    t0 = time.perf_counter()
    g = opts.grow
    device = resolve_device(g.device)  # a missing GPU fails here, before any work
    tracker = Tracker(opts.tracking_uri)
    tracker.check_reachable()
    try:
        parent = tracker.resolve_model(opts.model)
    except LookupError as exc:
        raise ConfigError("model", str(exc.args[0])) from None
    parent_ref = f"{parent.name}/{parent.version}"
    parent_uri = ckpt.resolve(parent.source)
    manifest = ckpt.read_manifest(parent_uri)
    layers = g.grown_layers(manifest.config)
    data_dir, data_uri, base_domains = _domains(opts, parent)
    check_tokenizer(data_dir, manifest, parent_ref)
    name = opts.register_as or parent.name
    output_dir = f"{storage.checkpoint_root(opts.checkpoint_root)}/{name}/add-expert-"
    output_dir += uuid.uuid4().hex[:12]

    torch.manual_seed(g.seed)
    new_train = TokenData.load(data_dir, [opts.domain], "train")
    base_train = TokenData.load(data_dir, base_domains, "train")
    val = TokenData.load(data_dir, [opts.domain, *base_domains], "validation")
    parent_model: MoETransformer = ckpt.load_model(parent_uri)[0].eval()
    eval_cfg = TrainConfig(batch_size=8, seq_len=g.seq_len, eval_batches=EVAL_BATCHES)
    stats = domain_stats(
        parent_model,
        _batches(new_train, g.stats_batches, g.seq_len, g.seed),
        _batches(base_train, g.stats_batches, g.seq_len, g.seed + 1),
        layers,
    )
    child, added = grow(parent_model, layers, g.per_layer, stats)
    added_desc = ",".join(f"{layer}:{e}" for layer, es in added.items() for e in es)
    record = lineage.Lineage(
        pipeline="add_expert",
        parent=parent_ref,
        trained_parts=f"experts:{added_desc} (new, with their gate rows)",
        domains=[opts.domain],
        data_digest=lineage.data_digest(data_dir, [opts.domain, *base_domains]),
        config_digest=lineage.digest({"model": to_dict(child.cfg), "grow": to_dict(g)}),
        ray_job_id=lineage.ray_job_id(),
        git_revision=lineage.git_revision(),
        data_uri=data_uri,
    )
    with tracker.run(opts.experiment, run_name="add_expert") as run_id:
        tracker.log_params(
            {f"grow.{k}": v for k, v in to_dict(g).items()}
            | {"parent_checkpoint": parent_uri, "base_domains": ",".join(base_domains)}
            | {"added_experts": added_desc, "replay_share": _replay_share(g)}
            | {"grow.resolved_device": str(device)}
            | record.tags()
        )
        tracker.log_dataset(
            name=f"{opts.domain}+replay",
            digest=record.data_digest[:36],
            source=data_uri,
            profile={"domain": opts.domain, "replayed": base_domains},
        )
        val_before = evaluate(parent_model, val, eval_cfg)
        tracker.log_metrics({f"parent_{k}": v for k, v in val_before.items()}, 0)

        def log(step: int, metrics: dict[str, float]) -> None:
            if (step + 1) % opts.log_every == 0 or step + 1 == g.steps:
                tracker.log_metrics(metrics, step + 1)

        # statistics and surgery ran on the CPU (a few batches); training moves the child
        train_new_experts(child, added, new_train, base_train, g, on_step=log)
        val_after = evaluate(child, val, eval_cfg)
        shares = {}
        for d in val.domains:
            one = TokenData.load(data_dir, [d], "validation")
            shares[d] = new_expert_share(child, _batches(one, 2, g.seq_len, 7), added)
        child = child.cpu()
        verify_unchanged(parent_model, child, added)
        tracker.log_metrics(
            val_after
            | {
                f"new_expert_share/{d}/L{layer}": s
                for d, by_layer in shares.items()
                for layer, s in by_layer.items()
            },
            g.steps,
        )
        uri = ckpt.save_checkpoint(
            output_dir,
            f"step-{g.steps:06d}",
            child,
            tokenizer_path=f"{data_dir}/tokenizer.json",
            version={"step": g.steps, "run_id": run_id, "domains": [*base_domains, opts.domain]},
            parent=parent_uri,
        )
        tags = record.tags() | {"added_experts": added_desc, "n_experts": str(child.cfg.n_experts)}
        mv = register_checkpoint(tracker, name, source=uri, run_id=run_id, tags=tags)
        tracker.set_tags({"registered_version": mv.version})
    return AddExpertResult(
        model_version=mv,
        checkpoint_uri=uri,
        run_id=run_id,
        added=added,
        val_before=val_before,
        val_after=val_after,
        new_expert_share=shares,
        seconds=time.perf_counter() - t0,
    )


def _replay_share(g: GrowConfig) -> float:
    """The share of each step's sequences that are replayed base-domain text."""
    return g.replay_rows / (g.replay_rows + g.batch_size)


def parse_layers(text: str) -> tuple[int, ...] | None:
    """``all`` or a comma-separated list of layer indices."""
    if text.strip() == "all":
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            "layers", f"must be 'all' or layer numbers like 0,2, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="expertmesh.pipelines.add_expert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = GrowConfig()
    p.add_argument("--model", required=True, help="registered NAME[/VERSION] or NAME@ALIAS")
    p.add_argument("--domain", required=True, help="the new domain, e.g. legal")
    p.add_argument("--per-layer", type=int, default=defaults.per_layer)
    p.add_argument("--layers", default="all", help="'all' or MoE layers to grow, e.g. 0,2")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--leak-weight", type=float, default=defaults.leak_weight)
    p.add_argument("--replay-rows", type=int, default=defaults.replay_rows)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--device",
        default=defaults.device,
        help="where the new experts train: auto (a CUDA GPU if PyTorch sees one), cpu, cuda[:N]",
    )
    p.add_argument("--data", default=None, help="prepared data dir (default: the parent's)")
    p.add_argument("--base-domains", default=None, help="default: the parent's domains")
    p.add_argument("--register-as", default=None, help="registered model name (default: parent's)")
    p.add_argument("--experiment", default="expertmesh")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the cluster's)")
    p.add_argument(
        "--checkpoint-root", default=None, help="pyarrow.fs URI (default: the cluster's)"
    )
    return p


def options_from_args(args: argparse.Namespace) -> AddExpertOptions:
    grow_cfg = GrowConfig(
        layers=parse_layers(args.layers),
        per_layer=args.per_layer,
        steps=args.steps,
        batch_size=args.batch_size,
        replay_rows=args.replay_rows,
        seq_len=args.seq_len,
        lr=args.lr,
        leak_weight=args.leak_weight,
        seed=args.seed,
        device=args.device,
    )
    base = (
        [d.strip() for d in args.base_domains.split(",") if d.strip()]
        if args.base_domains
        else None
    )
    return AddExpertOptions(
        model=args.model,
        domain=args.domain,
        grow=grow_cfg,
        data=args.data,
        base_domains=base,
        register_as=args.register_as,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        checkpoint_root=args.checkpoint_root,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = add_expert(options_from_args(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mv = result.model_version
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"mlflow run: {result.run_id}")
    print(f"added experts (layer: indices): {result.added}")
    for key in sorted(result.val_after):
        before, after = result.val_before[key], result.val_after[key]
        print(f"{key}: {before:.4f} -> {after:.4f} ({(after / before - 1) * 100:+.1f} %)")
    for domain, by_layer in result.new_expert_share.items():
        cells = "  ".join(f"L{layer} {share:.1%}" for layer, share in by_layer.items())
        print(f"tokens picking a new expert, {domain}: {cells}")
    print(f"registered: {mv.name} version {mv.version} (parent {mv.tags['parent']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training on Ray Train (V2): a ``TorchTrainer`` whose workers run the shared ``train_step``.

``python -m expertmesh.pipelines.train --config configs/tiny.yaml --workers 2`` lands here.

- DDP through ``ray.train.torch.prepare_model``: gloo on CPUs, NCCL on GPUs (Ray's default).
- Input: Ray Data reads the Parquet token shards once into the object store and hands every
  worker the whole train split (``ray.train.get_dataset_shard``, not split: a few tens of MB
  of tokens); each worker samples the *global* batch of a step from the same seeded generator
  and trains on its slice of rows. The global batch of step s is thus the same for any number
  of workers (2 workers at batch b train like 1 worker at 2b), and a restarted run draws
  exactly the batches the lost one would have drawn.
- Checkpoints: rank 0 writes the project's expert-sharded format with
  :func:`expertmesh.platform.checkpoint.save_checkpoint` (atomic, manifest last) into the run's
  folder under :func:`expertmesh.platform.storage.checkpoint_root` and reports it with
  ``ray.train.report``. When a worker dies, Ray Train (``FailureConfig(max_failures)``) starts
  the group again and every worker resumes from ``ray.train.get_checkpoint()`` (or the run
  folder's ``latest.json`` where Ray had not yet registered the newest report).
- Tracking: the driver opens the MLflow run, rank 0 logs into it the metrics the
  single-process loop logs (averaged over the ranks), the driver registers the result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
import torch.distributed as dist

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ExperimentConfig
from expertmesh.platform.data import TokenData, load_tokenizer, read_manifest
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.platform.lineage import Lineage
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.parts import Freezer, TrainedParts
from expertmesh.platform.storage import checkpoint_root
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import (
    TrainResult,
    chat_template_of,
    checkpoint_version,
    evaluate,
    is_due,
    layer_metrics,
    make_optimizer,
    pack_train_state,
    register_model,
    restore,
    run_params,
    train_step,
)
from expertmesh.runtime import LocalRayOptions, init_ray

if TYPE_CHECKING:
    import ray.data
    import ray.train

log = logging.getLogger(__name__)

StepHook = Callable[[int, int], None]


@dataclass(kw_only=True, slots=True)
class RayTrainOptions:
    """How a training run spreads over Ray Train workers (the ``--workers`` flags)."""

    workers: int = 1
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves (fractions on small hosts)
    gpus_per_worker: float = 0.0  # > 0: CUDA devices and NCCL instead of the CPU and gloo
    max_failures: int = 2  # worker-group restarts (from the last checkpoint); -1: unlimited
    checkpoint_root: str | None = None  # default: expertmesh.platform.storage.checkpoint_root()
    # called on every worker after every step with (world rank, steps done): a probe for
    # progress and the fault-injection point of the recovery tests
    on_step: StepHook | None = None

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError("workers", f"must be a whole number >= 1, got {self.workers!r}")
        if not self.cpus_per_worker > 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker!r}")
        if not self.gpus_per_worker >= 0:
            raise ConfigError("gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError("max_failures", f"must be -1 or >= 0, got {self.max_failures!r}")


def add_ray_train_flags(p: argparse.ArgumentParser) -> None:
    """The ``--workers`` flags of every pipeline that can train on Ray Train."""
    ray = p.add_argument_group("Ray Train (given --workers)")
    ray.add_argument("--workers", type=int, help="train on Ray Train with N DDP workers")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="logical CPUs per worker")
    ray.add_argument(
        "--max-failures", type=int, default=2, help="restarts from the last checkpoint (-1: any)"
    )


def ray_train_options(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> RayTrainOptions | None:
    """The Ray Train options the flags ask for; None (train in this process) without
    ``--workers``, where the other Ray Train flags are refused rather than ignored."""
    if args.workers is None:
        for flag in ("gpus_per_worker", "cpus_per_worker", "max_failures"):
            if getattr(args, flag) != parser.get_default(flag):
                raise ConfigError(flag, "applies to Ray Train only; add --workers N")
        return None
    return RayTrainOptions(
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_failures=args.max_failures,
        checkpoint_root=args.checkpoint_root,
    )


def token_datasets(data_dir: str, domains: tuple[str, ...]) -> dict[str, ray.data.Dataset]:
    """Ray Data datasets of the ``train`` and ``validation`` token shards of ``domains``, whose
    rows come in the order :meth:`TokenData.load` reads them (files, then rows)."""
    import ray.data

    manifest = read_manifest(data_dir)
    out = {}
    for split in ("train", "validation"):
        entries = manifest.get("splits", {}).get(split, {})
        missing = [d for d in domains if d not in entries]
        if missing:
            raise ConfigError("data.train_domains", f"{missing} not prepared in {data_dir}")
        paths = [f"{data_dir}/{split}/{name}" for d in domains for name in entries[d]["shards"]]
        ds = ray.data.read_parquet(paths).select_columns(["domain", "tokens"])
        # NOTE: Ray Data otherwise hands blocks over as their read tasks finish; the sampler's
        # windows (and so every batch) depend on the stream's order
        ds.context.execution_options.preserve_order = True
        out[split] = ds
    return out


def _local_ray(opts: RayTrainOptions) -> LocalRayOptions:
    # NOTE: the workers' CPUs plus two for Ray Data's read tasks (one CPU each), which
    # otherwise wait for CPUs the workers hold while the workers wait for their data
    base = LocalRayOptions()
    need = math.ceil(opts.workers * opts.cpus_per_worker) + 2
    return dataclasses.replace(base, num_cpus=max(base.num_cpus, need))


def train_on_ray(
    cfg: ExperimentConfig,
    opts: RayTrainOptions,
    *,
    tracker: Tracker | None = None,
    register: bool = True,
    version_tags: dict[str, str] | None = None,
    parent_checkpoint: str | None = None,
    trained_parts: TrainedParts | None = None,
    lineage: Lineage | None = None,
) -> TrainResult:
    """Train ``cfg`` with ``opts.workers`` Ray Train workers; log to MLflow, register the result.

    Fine-tuning (:mod:`expertmesh.pipelines.finetune`): every worker starts from
    ``parent_checkpoint`` and trains only ``trained_parts`` (the rest frozen, as the
    single-process loop does); checkpoints then reference the parent's unchanged files.
    ``lineage`` is logged as the run's dataset.

    Joins the cluster at ``RAY_ADDRESS`` (as a Ray job does) or starts a local one (and stops
    it at the end). ``cfg.train.batch_size`` is the batch of *one* worker. Checkpoints go to
    ``<checkpoint root>/train-<MLflow run id>/step-NNNNNN``.

    Example:
        >>> result = train_on_ray(load_config("configs/tiny.yaml"), RayTrainOptions(workers=2))
        >>> model, manifest = load_model(result.checkpoint_uri)
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    if (parent_checkpoint is None) != (trained_parts is None):
        raise ConfigError(
            "trained_parts", "fine-tuning on Ray Train needs both a parent checkpoint and parts"
        )
    if tc.device.startswith("cuda") and opts.gpus_per_worker <= 0:
        raise ConfigError("gpus_per_worker", f"train.device is {tc.device!r}; give workers GPUs")
    # the workers may run in another directory (a Ray job's) or on another node
    data_dir = os.path.abspath(cfg.data.data_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    tokenizer_path = f"{data_dir}/tokenizer.json"
    if load_tokenizer(data_dir).get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", "is smaller than the tokenizer's vocabulary")
    vocab = int(read_manifest(data_dir)["tokenizer_vocab_size"])
    tracker = tracker or Tracker()
    resources = {"CPU": opts.cpus_per_worker}
    if opts.gpus_per_worker > 0:
        resources["GPU"] = opts.gpus_per_worker

    started = init_ray(local=_local_ray(opts))
    try:
        storage = checkpoint_root(opts.checkpoint_root)  # the joined cluster's, if it has one
        with tracker.run(tc.experiment, run_name="train") as run_id:
            name = f"train-{run_id}"
            run_dir = f"{storage.rstrip('/')}/{name}"
            tracker.set_tags({"ray_train.run_dir": run_dir, "ray_train.workers": str(opts.workers)})
            # NOTE: read once into the object store, not by every worker at every (re)start:
            # the workers then only fetch blocks (a few tens of MB of int32 tokens here;
            # under load, per-worker reads took 20-35 s of a 2-core host's start-up)
            t0 = time.perf_counter()
            datasets = {
                split: ds.materialize()
                for split, ds in token_datasets(data_dir, cfg.data.train_domains).items()
            }
            tracker.log_metrics({"data_read_s": time.perf_counter() - t0}, 0)
            if lineage is not None:
                tracker.log_dataset(
                    name=",".join(lineage.domains),
                    digest=lineage.data_digest,
                    source=data_dir,
                    profile={"domains": lineage.domains},
                )
            trainer = TorchTrainer(
                _train_loop,
                train_loop_config={
                    "cfg": cfg,
                    "run_id": run_id,
                    "tracking_uri": tracker.uri,
                    "run_dir": run_dir,
                    "vocab_size": vocab,
                    "on_step": opts.on_step,
                    "submitted_at": time.time(),
                    "parent_checkpoint": parent_checkpoint,
                    "trained_parts": trained_parts,
                },
                scaling_config=ray.train.ScalingConfig(
                    num_workers=opts.workers,
                    use_gpu=opts.gpus_per_worker > 0,
                    resources_per_worker=resources,
                ),
                run_config=ray.train.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
                ),
                datasets=datasets,
                # NOTE: not split: every worker reads the whole split in file order
                dataset_config=ray.train.DataConfig(
                    datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
                ),
            )
            trainer.fit()  # raises once the failures exceed max_failures
            # NOTE: the run folder's latest.json, written last by every save, names the final
            # checkpoint (the same one Ray's Result.checkpoint does)
            final = ckpt.resolve(run_dir)
            metrics = dict(tracker.client.get_run(run_id).data.metrics)
            result = TrainResult(
                checkpoint_uri=final, run_id=run_id, steps=tc.steps, metrics=metrics
            )
            if register:
                model, _ = ckpt.load_model(final)
                tags = {"ray_train.workers": str(opts.workers)}
                result.model_version = register_model(
                    tracker,
                    model,
                    cfg,
                    tokenizer_path=tokenizer_path,
                    step=tc.steps,
                    run_id=run_id,
                    version_tags=tags | (version_tags or {}),
                )
        return result
    finally:
        if started:
            ray.shutdown()


# --- on the workers ----------------------------------------------------------------------------


def _tables(shard: ray.data.DataIterator) -> Iterator[pa.Table]:
    yield from shard.iter_batches(batch_size=None, batch_format="pyarrow")


def _mean_over_ranks(
    metrics: dict[str, float], device: torch.device, world: int
) -> dict[str, float]:
    """Every rank's scalar metrics averaged: with equal batches per rank the token-mean losses
    and load fractions of the global batch (the Switch aux loss, a product of batch means, is
    then the mean of the ranks' own)."""
    if world == 1:
        return metrics
    keys = list(metrics)  # NOTE: same keys in the same order on every rank (same code, same model)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world).tolist(), strict=True))


def _already_persisted(checkpoint: ray.train.Checkpoint, _dir_name: str) -> ray.train.Checkpoint:
    # save_checkpoint already wrote it, atomically and manifest last, where Ray would upload it
    return checkpoint


def _complete(uri: str) -> bool:
    try:
        ckpt.read_manifest(uri)
    except CheckpointError:
        return False
    return True


def _resume_uri(run_dir: str) -> str | None:
    """The newest complete checkpoint of this run: the one Ray Train hands back, or the run
    folder's ``latest.json``, whichever is at the later step."""
    import ray.train

    found = []
    reported = ray.train.get_checkpoint()
    if reported is not None:
        found.append(f"{run_dir}/{posixpath.basename(reported.path.rstrip('/'))}")
    # NOTE: Ray's controller registers a reported checkpoint when it next polls the workers,
    # so a worker that dies within a poll of reporting loses the registration (get_checkpoint()
    # then returns the one before), not the checkpoint: save_checkpoint finished it and moved
    # latest.json last
    if _complete(run_dir):
        found.append(ckpt.resolve(run_dir))
    if not found:
        return None
    return max(found, key=lambda uri: ckpt.read_manifest(uri).version["step"])


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, resume, train with the shared step, checkpoint, log (rank 0)."""
    import ray.train
    import ray.train.torch

    cfg: ExperimentConfig = config["cfg"]
    tc = cfg.train
    run_id: str = config["run_id"]
    on_step: StepHook | None = config["on_step"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank, as in train()
    device = ray.train.torch.get_device()
    parent: str | None = config["parent_checkpoint"]
    model = (ckpt.load_model(parent)[0] if parent else MoETransformer(cfg.model)).to(device)
    freezer = None
    if config["trained_parts"] is not None:
        # NOTE: before the optimizer and DDP, which both take only the parameters that train
        freezer = Freezer(config["trained_parts"])
        freezer.apply(model)
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    start = 0
    resume_from = _resume_uri(config["run_dir"])
    if resume_from is not None:
        start, _ = restore(resume_from, model, optimizer, gen)
    # NOTE: no buffer broadcast per step: the selection biases stay equal because their
    # update all-reduces the expert loads (update_balance_bias), RoPE's are constants
    forward = ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    domains, vocab = cfg.data.train_domains, config["vocab_size"]
    t0 = time.perf_counter()
    train_data = TokenData.from_tables(
        _tables(ray.train.get_dataset_shard("train")), domains, vocab
    )
    tracker = Tracker(config["tracking_uri"]) if rank == 0 else None
    val_data = None
    if tracker is not None:
        shard = ray.train.get_dataset_shard("validation")
        val_data = TokenData.from_tables(_tables(shard), domains, vocab)
    log.info(
        "rank %d/%d: %d train tokens from Ray Data in %.1f s; starting at step %d (%s)",
        rank,
        world,
        train_data.n_tokens(),
        time.perf_counter() - t0,
        start,
        resume_from or "no checkpoint",
    )

    b, end = tc.batch_size, tc.steps
    rows = slice(rank * b, (rank + 1) * b)  # this rank's rows of each global batch
    tokens_per_step = world * b * tc.seq_len
    running = tracker.run(tc.experiment, run_id=run_id) if tracker else contextlib.nullcontext()
    with running:
        if tracker is not None and val_data is not None and start == 0:
            params = run_params(cfg, model, device) | {
                "ray_train.workers": world,
                "ray_train.global_batch_size": world * b,
            }
            tracker.log_params(params)
            entropy = {f"unigram_entropy/{d}": val_data.unigram_entropy(d) for d in domains}
            since_submit = time.time() - config["submitted_at"]
            tracker.log_metrics(entropy | {"submit_to_first_step_s": since_submit}, 0)
        t_last, steps_since = time.perf_counter(), 0
        for step in range(start, end):
            batch = train_data.sample(world * b, tc.seq_len, gen)[rows]
            metrics, stats = train_step(model, optimizer, batch, step, tc, forward=forward)
            if freezer is not None:
                freezer.after_step()
            steps_since += 1
            done = step + 1
            if is_due(done, tc.log_every, end):
                logged = _mean_over_ranks(metrics | layer_metrics(stats), device, world)
                now = time.perf_counter()
                logged["tokens_per_s"] = steps_since * tokens_per_step / (now - t_last)
                t_last, steps_since = now, 0
                if tracker is not None:
                    tracker.log_metrics(logged, done)
            if tracker is not None and val_data is not None and is_due(done, tc.eval_every, end):
                tracker.log_metrics(evaluate(model, val_data, tc), done)
            if is_due(done, tc.checkpoint_every, end):
                name = f"step-{done:06d}"
                reported = None
                if rank == 0:
                    uri = f"{config['run_dir']}/{name}"
                    # NOTE: complete already when an earlier attempt of this run wrote it and
                    # died before latest.json moved on; resumed exactly, it holds this state
                    if not _complete(uri):
                        ckpt.save_checkpoint(
                            config["run_dir"],
                            name,
                            model,
                            tokenizer_path=f"{cfg.data.data_dir}/tokenizer.json",
                            version=checkpoint_version(cfg, done, run_id),
                            train_state=pack_train_state(optimizer, done, gen, run_id),
                            parent=parent,
                            chat_template=chat_template_of(cfg),
                        )
                    reported = ray.train.Checkpoint(uri)
                ray.train.report(
                    {"step": done, "loss": metrics["loss"], "ce_loss": metrics["ce_loss"]},
                    checkpoint=reported,
                    checkpoint_dir_name=name,
                    checkpoint_upload_fn=_already_persisted,
                    delete_local_checkpoint_after_upload=False,  # it *is* the stored one
                )
            if on_step is not None:
                on_step(rank, done)

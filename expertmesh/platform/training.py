"""MoE LM training: the step function, the single-process loop, checkpoints and MLflow logging.

:func:`train_step` is the one step both loops call: :func:`train` here (one process) and the
Ray Train workers of :mod:`expertmesh.pipelines.train_ray`, which pass their
``DistributedDataParallel`` wrapper as ``forward``. The bookkeeping both share (what a
checkpoint's train state holds, how a loop resumes, the MLflow params, the registry version)
lives here too, so the two loops differ only in where batches and checkpoints go.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm import tqdm

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ExperimentConfig, TrainConfig, to_dict
from expertmesh.platform.data import TokenData, load_tokenizer
from expertmesh.platform.devices import resolve_device
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.model.gates import balance_bias_step
from expertmesh.platform.model.moe import LayerStats
from expertmesh.platform.storage import checkpoint_root, local_path_of
from expertmesh.platform.tracking import CHECKPOINT_ARTIFACT, ModelVersionInfo, Tracker

if TYPE_CHECKING:
    from expertmesh.platform.lineage import Lineage
    from expertmesh.platform.parts import Freezer

log = logging.getLogger(__name__)


def chat_template_of(cfg: ExperimentConfig) -> str | None:
    """The text of the chat template ``cfg.data`` names, to save with each checkpoint."""
    from expertmesh.platform import chat

    name = cfg.data.chat_template
    return None if name is None else chat.template_named(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or gates' biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_step(
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    batch_BT1: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    *,
    forward: torch.nn.Module | None = None,
) -> tuple[dict[str, float], list[LayerStats]]:
    """One optimisation step on a (B, T+1) token batch; returns scalar metrics and layer stats.

    The batch moves to the model's device. ``forward`` is the module to call instead of
    ``model`` itself: a ``DistributedDataParallel`` wrapper of it, whose backward averages the
    gradients over the ranks (the metrics stay this rank's own).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    device = _device_of(model)
    batch_BT1 = batch_BT1.to(device, non_blocking=True)
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    model.train()
    with _autocast(cfg, device):
        out = (forward or model)(inputs_BT)
        loss, ce = model.loss(out, targets_BT)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    stats = out.layer_stats
    bias_metrics = update_balance_bias(model, stats)
    dropped = sum(s.dropped_fraction for s in stats) / max(1, len(stats))
    metrics = {
        "loss": float(loss.detach()),
        "ce_loss": float(ce.detach()),
        "aux_loss": float(out.aux_loss.detach()),
        "z_loss": float(out.z_loss.detach()),
        "grad_norm": float(grad_norm),
        "lr": optimizer.param_groups[0]["lr"],
        "dropped_fraction": dropped,
    }
    return metrics | bias_metrics, stats


@torch.no_grad()
def update_balance_bias(model: MoETransformer, stats: list[LayerStats]) -> dict[str, float]:
    """Move every MoE layer's selection bias by this step's load (``balance_bias_rate`` > 0);
    returns ``expert_bias_max_abs/L{layer}`` for MLflow, empty when balancing is off.

    ``stats`` are the layers' stats of the step's batch; under ``torch.distributed`` the loads
    are summed over ranks first, so every replica takes the same step and the biases stay equal.
    """
    rate = model.cfg.balance_bias_rate
    if rate <= 0 or not stats:
        return {}
    counts_LE = torch.stack([s.counts_E for s in stats])  # L MoE layers x E experts
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_LE)
    moe = model.moe_layers()
    out: dict[str, float] = {}
    for s, counts_E in zip(stats, counts_LE, strict=True):
        if not moe[s.layer].gate.weight.requires_grad:  # a frozen router keeps its bias too
            continue
        bias_E = moe[s.layer].expert_bias
        balance_bias_step(bias_E, counts_E, rate)
        out[f"expert_bias_max_abs/L{s.layer}"] = float(bias_E.abs().max())
    return out


def layer_metrics(stats: list[LayerStats]) -> dict[str, float]:
    """Per-layer aux/z losses and per-expert load fractions, keyed for MLflow."""
    out: dict[str, float] = {}
    for s in stats:
        out[f"aux_loss/L{s.layer}"] = float(s.aux_loss.detach())
        out[f"z_loss/L{s.layer}"] = float(s.z_loss.detach())
        for e, frac in enumerate(s.load_fractions()):
            out[f"load/L{s.layer}/E{e}"] = frac
    return out


@torch.no_grad()
def evaluate(
    model: MoETransformer, data: TokenData, cfg: TrainConfig, seed: int = 1234
) -> dict[str, float]:
    """Mean validation cross-entropy per domain on fixed (seeded) batches."""
    model.eval()
    device = _device_of(model)
    out: dict[str, float] = {}
    for domain in data.domains:
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(cfg.eval_batches):
            batch = data.sample(cfg.batch_size, cfg.seq_len, gen, domain=domain).to(device)
            with _autocast(cfg, device):
                res = model(batch[:, :-1])
                _, ce = model.loss(res, batch[:, 1:])
            losses.append(float(ce))
        out[f"val_loss/{domain}"] = sum(losses) / len(losses)
    return out


@dataclass(kw_only=True, slots=True)
class TrainResult:
    checkpoint_uri: str
    run_id: str
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: ModelVersionInfo | None = None


def pack_train_state(
    optimizer: torch.optim.Optimizer, step: int, gen: torch.Generator, run_id: str
) -> bytes:
    """What a checkpoint needs besides the weights to resume exactly: optimizer state, the step,
    the data sampler's and torch's RNG states and the MLflow run."""
    buf = io.BytesIO()
    state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "run_id": run_id,
    }
    torch.save(state, buf)
    return buf.getvalue()


def restore(
    uri: str,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[int, str | None]:
    """Load checkpoint ``uri``'s weights, optimizer state and RNG states into the given objects;
    returns the step it was saved at and its MLflow run id."""
    loaded, _ = ckpt.load_model(uri)
    model.load_state_dict(loaded.state_dict())
    state = torch.load(
        io.BytesIO(ckpt.load_train_state(uri) or b""),
        weights_only=False,
        map_location="cpu",  # the optimizer moves its state to the parameters' device
    )
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and _device_of(model).type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["run_id"]


def checkpoint_version(cfg: ExperimentConfig, step: int, run_id: str) -> dict[str, object]:
    """The version record a training checkpoint's manifest carries."""
    return {"step": step, "run_id": run_id, "domains": list(cfg.data.train_domains)}


def run_params(
    cfg: ExperimentConfig, model: MoETransformer, device: torch.device
) -> dict[str, object]:
    """The MLflow params of a training run."""
    params: dict[str, object] = {f"model.{k}": v for k, v in to_dict(cfg.model).items()}
    params |= {f"train.{k}": v for k, v in to_dict(cfg.train).items()}
    params |= {"data.train_domains": ",".join(cfg.data.train_domains)}
    params |= {"train.resolved_device": str(device)}
    params |= {
        "n_params": model.num_parameters(),
        "n_active_params": model.num_parameters(active=True),
    }
    return params


def is_due(done: int, every: int, end: int) -> bool:
    """Whether step ``done`` (1-based) logs, evaluates or checkpoints on an ``every`` schedule."""
    return done % every == 0 or done == end


def _log_checkpoint(
    tracker: Tracker,
    model: MoETransformer,
    tokenizer_path: str,
    cfg: ExperimentConfig,
    step: int,
    run_id: str,
) -> str:
    """Log the weights (without optimizer state) as run artifacts; returns their artifact URI."""
    with tempfile.TemporaryDirectory(prefix="expertmesh-ckpt-") as tmp:
        local = ckpt.save_checkpoint(
            tmp,
            "model",
            model,
            tokenizer_path=tokenizer_path,
            version=checkpoint_version(cfg, step, run_id),
            chat_template=chat_template_of(cfg),
        )
        return tracker.log_artifacts(local, CHECKPOINT_ARTIFACT)


def register_model(
    tracker: Tracker,
    model: MoETransformer,
    cfg: ExperimentConfig,
    *,
    tokenizer_path: str,
    step: int,
    run_id: str,
    version_tags: dict[str, str] | None = None,
) -> ModelVersionInfo:
    """Log ``model`` into the active run's artifacts and register it as a new version of
    ``cfg.train.registered_model`` (``version_tags`` over the train pipeline's own); tags the
    run with the version."""
    artifact_uri = _log_checkpoint(tracker, model, tokenizer_path, cfg, step, run_id)
    tags = {
        "domains": ",".join(cfg.data.train_domains),
        "n_experts": str(cfg.model.n_experts),
        "parent_version": "",
        "pipeline": "train",
    } | (version_tags or {})
    mv = tracker.register_version(
        cfg.train.registered_model, source=artifact_uri, run_id=run_id, tags=tags
    )
    tracker.set_tags({"registered_version": mv.version})
    return mv


REFERENCE_ARTIFACT = "checkpoint-reference"


def register_checkpoint(
    tracker: Tracker, name: str, *, source: str, run_id: str, tags: dict[str, str]
) -> ModelVersionInfo:
    """Register checkpoint ``source`` (written by a pipeline under the checkpoint root) as a
    new version of ``name``.

    An MLflow server registers no local path outside its artifact store, and a checkpoint on
    a mount every node shares is a local path: there the version is registered from a
    reference to it (:func:`checkpoint.write_reference`) logged in run ``run_id``'s artifacts.
    """
    if tracker.is_server and local_path_of(source):
        with tempfile.TemporaryDirectory(prefix="expertmesh-ref-") as tmp:
            ckpt.write_reference(source, f"{tmp}/{REFERENCE_ARTIFACT}")
            tracker.client.log_artifacts(run_id, f"{tmp}/{REFERENCE_ARTIFACT}", REFERENCE_ARTIFACT)
        root = tracker.client.get_run(run_id).info.artifact_uri
        source = f"{root.rstrip('/')}/{REFERENCE_ARTIFACT}"
    return tracker.register_version(name, source=source, run_id=run_id, tags=tags)


def _find_resume(output_dir: str) -> str | None:
    try:
        return ckpt.resolve(output_dir)
    except Exception:  # no checkpoint yet
        return None


def train(
    cfg: ExperimentConfig,
    *,
    tracker: Tracker | None = None,
    resume: bool = True,
    progress: bool = True,
    register: bool = True,
    stop_after: int | None = None,
    model_factory: Callable[[], MoETransformer] | None = None,
    version_tags: dict[str, str] | None = None,
    freeze: Freezer | None = None,
    parent_checkpoint: str | None = None,
    lineage: Lineage | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data.train_domains``; checkpoint, log and register it.

    Resumes exactly from the latest checkpoint in ``cfg.train.output_dir`` when ``resume``
    (unset: ``<checkpoint root>/<registered_model>/train``, see
    :func:`expertmesh.platform.storage.checkpoint_root`).
    ``stop_after`` ends the loop early at that step (used to test resumption).
    ``freeze`` keeps the parts it freezes unchanged (fine-tuning); checkpoints then reference
    ``parent_checkpoint``'s unchanged files instead of copying them. ``lineage`` is logged as
    the run's dataset and the registered version's tags.
    """
    tc = cfg.train
    output_dir = tc.output_dir or f"{checkpoint_root()}/{tc.registered_model}/train"
    tracker = tracker or Tracker()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    train_data = TokenData.load(cfg.data.data_dir, cfg.data.train_domains, "train")
    val_data = TokenData.load(cfg.data.data_dir, cfg.data.train_domains, "validation")
    tokenizer_path = f"{cfg.data.data_dir}/tokenizer.json"
    if load_tokenizer(cfg.data.data_dir).get_vocab_size() > cfg.model.vocab_size:
        raise ValueError("model.vocab_size is smaller than the tokenizer's vocabulary")

    device = resolve_device(tc.device)
    model = (model_factory() if model_factory else MoETransformer(cfg.model)).to(device)
    if freeze is not None:
        freeze.apply(model)
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    start, run_id = 0, None
    resume_uri = _find_resume(output_dir) if resume else None
    if resume_uri:
        start, run_id = restore(resume_uri, model, optimizer, gen)
        log.info("resuming from %s at step %d", resume_uri, start)

    end = min(tc.steps, stop_after) if stop_after else tc.steps
    with tracker.run(tc.experiment, run_name="train", run_id=run_id) as run_id:
        if start == 0:
            tracker.log_params(run_params(cfg, model, device))
            if lineage is not None:
                tracker.log_dataset(
                    name=",".join(lineage.domains),
                    digest=lineage.data_digest,
                    source=cfg.data.data_dir,
                    profile={"domains": lineage.domains},
                )
            tracker.log_metrics(
                {f"unigram_entropy/{d}": val_data.unigram_entropy(d) for d in val_data.domains}, 0
            )
        bar = tqdm(range(start, end), initial=start, total=end, disable=not progress, desc="train")
        tokens_per_step = tc.batch_size * tc.seq_len
        metrics: dict[str, float] = {}
        t_last, steps_since = time.perf_counter(), 0
        uri = resume_uri or ""
        for step in bar:
            batch = train_data.sample(tc.batch_size, tc.seq_len, gen)
            metrics, stats = train_step(model, optimizer, batch, step, tc)
            if freeze is not None:
                freeze.after_step()
            steps_since += 1
            done = step + 1
            if is_due(done, tc.log_every, end):
                now = time.perf_counter()
                metrics["tokens_per_s"] = steps_since * tokens_per_step / (now - t_last)
                t_last, steps_since = now, 0
                tracker.log_metrics(metrics | layer_metrics(stats), done)
                bar.set_postfix(
                    loss=f"{metrics['ce_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
            if is_due(done, tc.eval_every, end):
                val = evaluate(model, val_data, tc)
                metrics |= val
                tracker.log_metrics(val, done)
            if is_due(done, tc.checkpoint_every, end):
                uri = ckpt.save_checkpoint(
                    output_dir,
                    f"step-{done:06d}",
                    model,
                    tokenizer_path=tokenizer_path,
                    version=checkpoint_version(cfg, done, run_id),
                    train_state=pack_train_state(optimizer, done, gen, run_id),
                    parent=parent_checkpoint,
                    chat_template=chat_template_of(cfg),
                )
        result = TrainResult(checkpoint_uri=uri, run_id=run_id, steps=end, metrics=metrics)
        if register and end == tc.steps:
            result.model_version = register_model(
                tracker,
                model,
                cfg,
                tokenizer_path=tokenizer_path,
                step=end,
                run_id=run_id,
                version_tags=(lineage.tags() if lineage else {}) | (version_tags or {}),
            )
    return result

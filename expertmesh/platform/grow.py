"""Grow a trained MoE model by domain experts: the surgery, the initialisation and the training
that touches only what was added (the add_expert pipeline's core; no Ray inside).

A grown MoE layer gets ``per_layer`` new experts after its existing ones. Each new expert starts
as a copy of the existing expert the new domain's tokens pick most in that layer (MoExtend), and
its gate row is the domain's hidden-state prototype there: the mean MoE input over new-domain
tokens minus the mean over base-domain tokens, scaled to the mean norm of the existing rows
(mergekit's ``hidden`` gate mode). Only the new experts and their gate rows train; a gradient
mask keeps every other value of the grown tensors, and the rest of the model is frozen.

Shapes: L grown layers, E experts of a layer, D model width, N tokens, B batch, T positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertmesh.platform.config import ModelConfig, check_device_name
from expertmesh.platform.data import TokenData
from expertmesh.platform.devices import resolve_device
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.model.transformer import ModelOutput

# the grown tensors of an MoE layer, each with the expert axis first
GROWN = ("gate.weight", "experts.w13", "experts.w2")


@dataclass(kw_only=True, slots=True)
class GrowConfig:
    """How add_expert grows and trains a model."""

    layers: tuple[int, ...] | None = None  # MoE layers to grow (None: all)
    per_layer: int = 1  # new experts per grown layer
    steps: int = 300
    batch_size: int = 8  # new-domain sequences per step
    # base-domain sequences replayed per step, split evenly over the base domains
    replay_rows: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    # weight of the penalty on the new experts' router probability for base-domain tokens:
    # higher keeps more base tokens off the new experts, at a cost in the new domain's loss
    # (bench/add_expert.py, 3 seeds: 0.5 is the largest measured weight that still gains the
    # 20 % on legal while the base domains stay within +2 %; see docs/results.md)
    leak_weight: float = 0.5
    stats_batches: int = 4  # batches per domain for the initialisation's statistics
    seed: int = 0
    # where the new experts train: auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("per_layer", "steps", "batch_size", "seq_len", "stats_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.replay_rows < 0 or self.warmup_steps < 0:
            raise ConfigError("replay_rows", "replay_rows and warmup_steps must be >= 0")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)!r}")
        if not self.leak_weight >= 0:
            raise ConfigError("leak_weight", f"must be >= 0, got {self.leak_weight!r}")
        check_device_name(self.device)
        if self.layers is not None:
            self.layers = tuple(sorted(set(self.layers)))

    def grown_layers(self, cfg: ModelConfig) -> list[int]:
        """The MoE layers to grow, checked against ``cfg``."""
        if self.layers is None:
            return list(cfg.moe_layers)
        bad = [layer for layer in self.layers if layer not in cfg.moe_layers]
        if bad:
            raise ConfigError("layers", f"{bad} are not MoE layers; MoE layers: {cfg.moe_layers}")
        if not self.layers:
            raise ConfigError("layers", "name at least one MoE layer")
        return list(self.layers)


@dataclass(kw_only=True, slots=True)
class DomainStats:
    """What the initialisation needs, per grown layer: the new domain's expert picks and mean
    MoE inputs of both domains (and per picked expert, for more than one new expert)."""

    picks_E: dict[int, torch.Tensor]  # top-k assignments of new-domain tokens per expert
    mean_new_D: dict[int, torch.Tensor]
    mean_base_D: dict[int, torch.Tensor]
    mean_new_by_expert_ED: dict[int, torch.Tensor]  # over new-domain tokens that pick e


@torch.no_grad()
def domain_stats(
    model: MoETransformer,
    new_batches: Sequence[torch.Tensor],
    base_batches: Sequence[torch.Tensor],
    layers: Sequence[int],
) -> DomainStats:
    """Run ``model`` on token batches (B, T) of the new and the base domains and gather the
    statistics the new experts start from."""
    model.eval()
    moe = model.moe_layers()
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        moe[layer].register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.__setitem__(layer, args[0])
        )
        for layer in layers
    ]
    D = model.cfg.d_model
    sums = {
        name: {layer: torch.zeros(D, dtype=torch.float64) for layer in layers}
        for name in ("new", "base")
    }
    counts = {"new": 0, "base": 0}
    picks = {layer: torch.zeros(moe[layer].n_experts, dtype=torch.long) for layer in layers}
    by_expert = {
        layer: torch.zeros(moe[layer].n_experts, D, dtype=torch.float64) for layer in layers
    }
    try:
        for name, batches in (("new", new_batches), ("base", base_batches)):
            for tokens_BT in batches:
                out = model(tokens_BT, return_routing=True)
                counts[name] += tokens_BT.numel()
                for st in out.layer_stats:
                    if st.layer not in picks:
                        continue
                    x_ND = seen[st.layer].reshape(-1, D).double()
                    sums[name][st.layer] += x_ND.sum(0)
                    if name == "new":
                        routing = st.router
                        picks[st.layer] += routing.counts_E.cpu()
                        by_expert[st.layer].index_add_(
                            0, routing.expert_idx_A, x_ND[routing.token_idx_A]
                        )
    finally:
        for h in hooks:
            h.remove()
    if not counts["new"] or not counts["base"]:
        raise ValueError("domain_stats needs tokens of both the new and the base domains")
    return DomainStats(
        picks_E=picks,
        mean_new_D={k: v / counts["new"] for k, v in sums["new"].items()},
        mean_base_D={k: v / counts["base"] for k, v in sums["base"].items()},
        mean_new_by_expert_ED={
            k: v / picks[k].clamp_min(1)[:, None].double() for k, v in by_expert.items()
        },
    )


@torch.no_grad()
def grow(
    parent: MoETransformer, layers: Sequence[int], per_layer: int, stats: DomainStats
) -> tuple[MoETransformer, dict[int, list[int]]]:
    """A copy of ``parent`` with ``per_layer`` new experts in each of ``layers``, initialised
    from ``stats``; returns it and the new experts' indices per layer."""
    cfg = parent.cfg
    counts = dict(cfg.layer_experts)
    added: dict[int, list[int]] = {}
    for layer in layers:
        E = cfg.experts_in(layer)
        counts[layer] = E + per_layer
        added[layer] = list(range(E, E + per_layer))
    child_cfg = dataclasses.replace(cfg, layer_experts=counts)
    dtype = parent.embed_tokens.weight.dtype
    child = MoETransformer(child_cfg).to(dtype)
    state = parent.state_dict()
    for layer, new in added.items():
        prefix = f"layers.{layer}.ffn."
        src = _sources(stats.picks_E[layer], len(new))
        rows = _gate_rows(parent.moe_layers()[layer].gate.weight, stats, layer, src)
        for name in GROWN:
            old = state[prefix + name]
            extra = old[src].clone() if name != "gate.weight" else rows.to(old.dtype)
            state[prefix + name] = torch.cat([old, extra])
        bias = prefix + "expert_bias"
        if bias in state:  # a new expert starts with no selection bias
            state[bias] = torch.cat([state[bias], state[bias].new_zeros(len(new))])
    child.load_state_dict(state)
    return child.eval(), added


def _sources(picks_E: torch.Tensor, n: int) -> list[int]:
    """The ``n`` experts the new domain picks most (ties: the lower index)."""
    order = sorted(range(len(picks_E)), key=lambda e: (-int(picks_E[e]), e))
    return [order[j % len(order)] for j in range(n)]


def _gate_rows(
    gate_ED: torch.Tensor, stats: DomainStats, layer: int, sources: list[int]
) -> torch.Tensor:
    """One gate row per new expert: the domain prototype, scaled to the existing rows' mean
    norm. With one new expert the prototype is the new domain's mean input minus the base
    domains'; with several, each uses the mean over the new-domain tokens that pick its source
    expert, so that the new experts do not start as exact twins."""
    base = stats.mean_base_D[layer]
    if len(sources) == 1:
        protos = [stats.mean_new_D[layer] - base]
    else:
        protos = [stats.mean_new_by_expert_ED[layer][e] - base for e in sources]
    norm = gate_ED.double().norm(dim=1).mean()
    rows = [p / p.norm().clamp_min(1e-12) * norm for p in protos]
    return torch.stack(rows).to(gate_ED.dtype)


def freeze_all_but_new(
    model: MoETransformer, added: dict[int, list[int]]
) -> tuple[list[torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Make only the new experts and gate rows trainable; returns the parameters to optimise
    and the gradient hooks (remove them when training ends).

    The grown tensors stay whole (one parameter per matrix, as serving and checkpoints expect);
    a gradient hook zeroes every row but the new ones, so an optimizer without weight decay
    leaves the old rows exactly as they were (Adam's step on a zero gradient is zero).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[torch.Tensor] = []
    hooks = []
    moe = model.moe_layers()
    for layer, new in added.items():
        keep_E = torch.zeros(moe[layer].n_experts, dtype=torch.bool)
        keep_E[new] = True
        for p in (moe[layer].gate.weight, moe[layer].experts.w13, moe[layer].experts.w2):
            p.requires_grad_(True)
            shape = (-1,) + (1,) * (p.dim() - 1)
            mask = keep_E.to(p.device).view(shape)
            hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
            trainable.append(p)
    return trainable, hooks


def leak(out: ModelOutput, added: dict[int, list[int]], base_rows_B: torch.Tensor) -> torch.Tensor:
    """The new experts' mean router probability over the tokens of the rows ``base_rows_B``
    (bool, B) marks as base-domain text, averaged over grown layers: what base tokens lose to
    the new experts. Differentiable."""
    B, T = out.logits.shape[:2]
    base_N = base_rows_B[:, None].expand(B, T).reshape(-1)
    terms = []
    for st in out.layer_stats:
        if st.layer in added and bool(base_N.any()):
            probs_NE = st.router.probs_TE
            terms.append(probs_NE[base_N][:, added[st.layer]].sum(-1).mean())
    if not terms:
        return out.logits.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


@torch.no_grad()
def new_expert_share(
    model: MoETransformer, batches: Sequence[torch.Tensor], added: dict[int, list[int]]
) -> dict[int, float]:
    """Per grown layer, the share of the batches' tokens whose top-k includes a new expert."""
    model.eval()
    device = next(model.parameters()).device
    new_by_layer = {layer: torch.tensor(es, device=device) for layer, es in added.items()}
    hits = dict.fromkeys(added, 0)
    total = 0
    for tokens_BT in batches:
        out = model(tokens_BT.to(device), return_routing=True)
        total += tokens_BT.numel()
        for st in out.layer_stats:
            if st.layer in added:
                r = st.router
                new_A = torch.isin(r.expert_idx_A, new_by_layer[st.layer])
                hits[st.layer] += int(torch.unique(r.token_idx_A[new_A]).numel())
    return {layer: h / max(total, 1) for layer, h in hits.items()}


def verify_unchanged(
    parent: MoETransformer, child: MoETransformer, added: dict[int, list[int]]
) -> None:
    """Raise naming the tensor if any value ``parent`` had differs in ``child`` (bit for bit):
    every non-grown tensor whole, and the old rows of grown ones."""
    grown = {f"layers.{layer}.ffn.{n}" for layer in added for n in (*GROWN, "expert_bias")}
    theirs = child.state_dict()
    for name, mine in parent.state_dict().items():
        other = theirs[name]
        if name in grown:
            other = other[: mine.shape[0]]
        if not torch.equal(mine, other):
            raise RuntimeError(f"{name} changed although it was frozen")


def _lr(step: int, cfg: GrowConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def replay_batch(
    base: TokenData, rows: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``rows`` base-domain windows, split as evenly as possible over the base domains (a small
    domain is replayed as often as a large one)."""
    domains = base.domains
    parts = [
        base.sample(n, seq_len, generator, domain=d)
        for i, d in enumerate(domains)
        if (n := rows // len(domains) + (i < rows % len(domains))) > 0
    ]
    return torch.cat(parts)


def train_new_experts(
    model: MoETransformer,
    added: dict[int, list[int]],
    new: TokenData,
    base: TokenData,
    cfg: GrowConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train the new experts and gate rows: cross-entropy on new-domain batches and on replayed
    base-domain batches, plus ``leak_weight`` times :func:`leak` on the replayed tokens. The
    model moves to ``cfg.device`` and stays there; batches follow it.
    ``on_step(step, metrics)``, if given, is called after every step. Returns the metrics."""
    model.to(resolve_device(cfg.device))
    params, hooks = freeze_all_but_new(model, added)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    try:
        _train_loop(model, added, new, base, cfg, params, optimizer, gen, history, on_step)
    finally:
        for h in hooks:
            h.remove()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return history


def _train_loop(model, added, new, base, cfg, params, optimizer, gen, history, on_step) -> None:
    device = next(model.parameters()).device
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        parts = [new.sample(cfg.batch_size, cfg.seq_len, gen)]
        if cfg.replay_rows:
            parts.append(replay_batch(base, cfg.replay_rows, cfg.seq_len, gen))
        # sampled on the CPU (the generator's stream does not depend on the device), then moved
        batch_BT1 = torch.cat(parts).to(device, non_blocking=True)
        base_B = torch.arange(batch_BT1.shape[0], device=device) >= cfg.batch_size
        model.train()
        out = model(batch_BT1[:, :-1])
        ce_BT = F.cross_entropy(
            out.logits.float().transpose(1, 2), batch_BT1[:, 1:], reduction="none"
        )
        ce_new = ce_BT[~base_B].mean()
        ce_base = ce_BT[base_B].mean() if cfg.replay_rows else ce_new.new_zeros(())
        penalty = leak(out, added, base_B)
        loss = ce_new + ce_base + cfg.leak_weight * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        metrics = {
            "loss": float(loss.detach()),
            "ce_new": float(ce_new.detach()),
            "ce_replay": float(ce_base.detach()),
            "leak": float(penalty.detach()),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)

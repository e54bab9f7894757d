"""Which parts of a model a fine-tune trains, freezing the rest and proving it stayed frozen.

Parts (``--train`` of ``expertmesh.pipelines.finetune``), comma-separated:

- ``router``: every MoE layer's gate (and its selection bias, ``balance_bias_rate``);
- ``dense``: every other non-expert weight (embeddings, attention, norms, dense FFNs, LM head);
- ``experts:L:E``: expert ``E`` of MoE layer ``L`` (``experts:1:0,1:3`` continues the list);
- ``all``: everything.

An expert bank stores all of a layer's experts in one tensor, so freezing some experts of a layer
masks their rows' gradients (they then count for nothing in gradient clipping) and puts their
exact values back after every optimizer step (AdamW's decoupled weight decay would move them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.placement import ExpertKey

_GATE_SUFFIXES = (".gate.weight", ".expert_bias")


def is_router_tensor(name: str) -> bool:
    """A state-dict name of a gate (router) tensor."""
    return name.endswith(_GATE_SUFFIXES) and ".ffn." in name


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainedParts:
    router: bool = False
    dense: bool = False
    experts: frozenset[ExpertKey] = frozenset()
    everything: bool = False

    def describe(self) -> str:
        """The parts in ``--train`` syntax (recorded in lineage)."""
        if self.everything:
            return "all"
        items = [p for p, on in (("router", self.router), ("dense", self.dense)) if on]
        items += [f"experts:{layer}:{e}" for layer, e in sorted(self.experts)]
        return ",".join(items)

    def trains_expert(self, key: ExpertKey) -> bool:
        return self.everything or key in self.experts

    def trains_tensor(self, name: str) -> bool:
        """Whether the non-expert state-dict tensor ``name`` trains."""
        if self.everything:
            return True
        return self.router if is_router_tensor(name) else self.dense


def parse_trained_parts(spec: str, cfg: ModelConfig, *, field: str = "train") -> TrainedParts:
    """Parse ``--train`` against the model it applies to.

    Raises:
        ConfigError: naming ``field``, for unknown parts or experts outside the model.
    """
    items = [item.strip() for item in (spec or "").split(",") if item.strip()]
    if not items:
        raise ConfigError(field, "name the parts to train: router, dense, experts:L:E, or all")
    router = dense = everything = False
    experts: set[ExpertKey] = set()
    in_experts = False
    for item in items:
        if item in ("router", "dense", "all"):
            router |= item == "router"
            dense |= item == "dense"
            everything |= item == "all"
            in_experts = False
            continue
        body = item.removeprefix("experts:")
        if body == item and not in_experts:
            raise ConfigError(
                field, f"unknown part {item!r}; parts are router, dense, experts:L:E and all"
            )
        in_experts = True
        try:
            layer, expert = (int(x) for x in body.split(":"))
        except ValueError:
            raise ConfigError(
                field, f"{item!r} is not experts:LAYER:EXPERT (e.g. experts:1:0)"
            ) from None
        if layer not in cfg.moe_layers or not 0 <= expert < cfg.n_experts:
            raise ConfigError(
                field,
                f"experts:{layer}:{expert} is outside the model: its MoE layers are "
                f"{cfg.moe_layers} with experts 0..{cfg.n_experts - 1}",
            )
        experts.add((layer, expert))
    return TrainedParts(
        router=router, dense=dense, experts=frozenset(experts), everything=everything
    )


class Freezer:
    """Freezes what ``parts`` leaves out of training, on one model.

    Call :meth:`apply` before building the optimizer and :meth:`after_step` after every
    optimizer step.
    """

    def __init__(self, parts: TrainedParts) -> None:
        self.parts = parts
        self._restore: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def apply(self, model: MoETransformer) -> None:
        expert_params = set()
        for layer, moe in model.moe_layers().items():
            if moe.experts is None:
                continue
            keep_E = torch.tensor(
                [self.parts.trains_expert((layer, e)) for e in range(model.cfg.n_experts)]
            )
            for param in (moe.experts.w13, moe.experts.w2):
                expert_params.add(id(param))
                if bool(keep_E.all()):
                    continue
                if not bool(keep_E.any()):
                    param.requires_grad_(False)
                    continue
                mask_E11 = keep_E.to(param.dtype).view(-1, 1, 1).to(param.device)
                param.register_hook(lambda grad, m=mask_E11: grad * m)
                frozen_idx = (~keep_E).nonzero().flatten().to(param.device)
                self._restore.append((param, frozen_idx, param.detach()[frozen_idx].clone()))
        for name, param in model.named_parameters():
            if id(param) not in expert_params and not self.parts.trains_tensor(name):
                param.requires_grad_(False)

    @torch.no_grad()
    def after_step(self) -> None:
        for param, idx, saved in self._restore:
            param.index_copy_(0, idx, saved)


def verify_frozen(parent_uri: str, child_uri: str, parts: TrainedParts) -> None:
    """Check, bit for bit, that what ``parts`` does not train is unchanged in ``child_uri``.

    Expert files and a dense file that nothing trained must carry the parent's sha256; in a
    dense file that changed, every frozen tensor must equal the parent's exactly.

    Raises:
        CheckpointError: naming the first part that changed.
    """
    parent, child = ckpt.read_manifest(parent_uri), ckpt.read_manifest(child_uri)
    for layer, e in parent.expert_keys():
        rel = ckpt.expert_file(layer, e)
        if (
            not parts.trains_expert((layer, e))
            and child.files[rel].sha256 != parent.files[rel].sha256
        ):
            raise CheckpointError(f"{child_uri}: frozen expert ({layer}, {e}) changed ({rel})")
    if parts.everything or (parts.router and parts.dense):
        return
    if child.files[ckpt.DENSE].sha256 == parent.files[ckpt.DENSE].sha256:
        return
    if not (parts.router or parts.dense):
        raise CheckpointError(f"{child_uri}: the frozen dense part changed ({ckpt.DENSE})")
    before, after = ckpt.load_dense(parent_uri), ckpt.load_dense(child_uri)
    for name, tensor in before.items():
        if not parts.trains_tensor(name) and (
            name not in after or not torch.equal(tensor, after[name])
        ):
            raise CheckpointError(f"{child_uri}: frozen tensor {name} changed")


__all__ = ["Freezer", "TrainedParts", "is_router_tensor", "parse_trained_parts", "verify_frozen"]

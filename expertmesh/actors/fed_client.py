"""A federated client as a Ray actor: the whole frozen MoE, LoRA adapters on its experts, and a
private data partition that only this actor reads.

The server sends a :class:`~expertmesh.platform.federated.strategy.TrainInstruction` (the global
adapters, the client's budget k and output scale) and gets back a
:class:`~expertmesh.platform.federated.strategy.ClientUpdate` (adapter delta, per-expert
activation counts, token counts, local loss). The actor holds nothing the server cannot send
again, so a dead one is replaced by a fresh actor with the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.data import TokenData
from expertmesh.platform.federated.local import local_train
from expertmesh.platform.federated.lora import LoRAConfig, LoRAMoE
from expertmesh.platform.federated.strategy import ClientUpdate, TrainInstruction


@dataclass(kw_only=True, slots=True, frozen=True)
class ClientActorSpec:
    """Everything needed to (re)start one client actor."""

    name: str
    checkpoint_uri: str  # the frozen base model
    partition_dir: str  # its private prepared data directory
    domain: str
    lora: LoRAConfig
    num_cpus: float
    num_gpus: float


class FedClient:
    """The actor class (started through :func:`start_client`)."""

    def __init__(self, spec: ClientActorSpec) -> None:
        self.spec = spec
        # NOTE: Ray sets OMP_NUM_THREADS from num_cpus, but torch reads its own default; match
        # the request so clients sharing a machine do not oversubscribe its cores
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        model, _ = ckpt.load_model(spec.checkpoint_uri)
        self.device = torch.device(
            "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        )
        self.lora = LoRAMoE(model.to(self.device), spec.lora).to(self.device)
        self.data = TokenData.load(spec.partition_dir, [spec.domain], "train")

    def ready(self) -> dict[str, int | str]:
        """What the client holds (sizes only: its data stays here)."""
        return {
            "client": self.spec.name,
            "n_tokens": self.data.n_tokens(),
            "device": str(self.device),
        }

    def train(self, instr: TrainInstruction) -> ClientUpdate:
        """One round of local training from the instruction's global adapters."""
        instr.adapters = {k: v.to(self.device) for k, v in instr.adapters.items()}
        update = local_train(self.lora, self.data, instr, client=self.spec.name)
        update.delta = {k: v.cpu() for k, v in update.delta.items()}
        return update


def start_client(spec: ClientActorSpec, *, name: str | None = None) -> ray.actor.ActorHandle:
    """Start the actor for ``spec`` with its resource requests; ``name`` makes it a named actor
    (so tools and tests can find it). ``max_restarts=0``: the server, not Ray, replaces a dead
    client, between rounds, so a restart never lands mid-round with stale state."""
    cls = ray.remote(FedClient)
    return cls.options(
        name=name,
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        max_restarts=0,
        max_concurrency=1,
    ).remote(spec)

"""The MoE transformer: attention, experts, gates, dispatch and losses (no Ray inside)."""

from expertmesh.platform.model.dispatch import Dispatcher, LocalDispatcher, combine, permute
from expertmesh.platform.model.experts import ExpertBank, run_experts
from expertmesh.platform.model.gates import Routing, route
from expertmesh.platform.model.layers import KVCache, SwiGLU
from expertmesh.platform.model.moe import LayerStats, MoELayer
from expertmesh.platform.model.transformer import ModelOutput, MoETransformer

__all__ = [
    "Dispatcher",
    "ExpertBank",
    "KVCache",
    "LayerStats",
    "LocalDispatcher",
    "MoELayer",
    "MoETransformer",
    "ModelOutput",
    "Routing",
    "SwiGLU",
    "combine",
    "permute",
    "route",
    "run_experts",
]

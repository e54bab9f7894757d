"""Dispatchers move routed tokens to experts and combine the results. One interface, two transports.

The MoE layer computes routing and calls ``dispatcher.dispatch(layer, x_TD, routing)``; the
dispatcher returns the combined output. :class:`LocalDispatcher` runs the layer's own experts in
process (training, tests); the serving path supplies a Ray-actor dispatcher with the same method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from expertmesh.platform.model.gates import Routing

if TYPE_CHECKING:
    from expertmesh.platform.model.experts import ExpertBank


class Dispatcher(Protocol):
    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Return (T, D): ``sum_a weight_a * expert_{e_a}(x_{t_a})`` over each token's assignments."""
        ...


def permute(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather token rows into expert order: (A, D)."""
    return x_TD.index_select(0, routing.token_idx_A)


def combine(y_AD: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """Scale expert outputs by their gate weights and scatter-add them back to tokens: (T, D)."""
    weighted_AD = y_AD * routing.weight_A.to(y_AD.dtype)[:, None]
    out_TD = y_AD.new_zeros(n_tokens, y_AD.shape[1])
    return out_TD.index_add_(0, routing.token_idx_A, weighted_AD)  # in place: no (T, D) copy


class LocalDispatcher:
    """Runs every expert of every layer in this process, from the model's own expert banks."""

    def __init__(self, banks: dict[int, ExpertBank]) -> None:
        self.banks = banks

    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        y_AD = self.banks[layer].run(permute(x_TD, routing), routing.counts_E)
        return combine(y_AD, routing, x_TD.shape[0])

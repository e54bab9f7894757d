"""One client's local training and the evaluation at a budget, shared by the Ray client actor,
the server's evaluation and the centralised baseline of ``bench/federated.py``.

Shapes: B sequences, T tokens per sequence, L MoE layers, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from expertmesh.platform.data import TokenData
from expertmesh.platform.federated.lora import LoRAMoE, budget
from expertmesh.platform.federated.strategy import ClientUpdate, TrainInstruction


def _ce(lora: LoRAMoE, batch_BT1: torch.Tensor):
    out = lora(batch_BT1[:, :-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch_BT1[:, 1:].reshape(-1))
    return ce, out


def local_train(
    lora: LoRAMoE, data: TokenData, instr: TrainInstruction, *, client: str | None = None
) -> ClientUpdate:
    """Train ``lora``'s adapters and output scale from ``instr``'s global adapters at budget
    ``instr.k``; returns the update (adapter delta, activations, loss) the server aggregates.

    The router and every base weight stay frozen, so the only thing a budget changes is how
    many experts each token reaches (and so which adapters get a gradient).
    """
    t0 = time.perf_counter()
    lora.load_adapters(instr.adapters)
    with torch.no_grad():
        lora.scale.fill_(instr.scale)
    start = lora.adapters()
    # NOTE: no weight decay: an expert that gets no gradient this round must come back
    # unchanged (its delta exactly 0), which the aggregation relies on
    opt = torch.optim.AdamW(lora.parameters(), lr=instr.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(instr.seed)
    model = lora.model[0]
    layers = list(model.moe_layers())
    counts_LE = torch.zeros(len(layers), model.cfg.max_experts, dtype=torch.int64)
    losses = []
    lora.train()
    with budget(model, instr.k):
        for _ in range(instr.local_steps):
            batch_BT1 = data.sample(instr.batch_size, instr.seq_len, gen)
            ce, out = _ce(lora, batch_BT1)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            losses.append(float(ce.detach()))
            for i, st in enumerate(out.layer_stats):
                counts_LE[i, : st.counts_E.numel()] += st.counts_E.cpu()
    end = lora.adapters()
    return ClientUpdate(
        client=client or instr.client,
        server_round=instr.server_round,
        delta={key: end[key] - start[key] for key in start},
        counts={
            layer: counts_LE[i, : model.cfg.experts_in(layer)].clone()
            for i, layer in enumerate(layers)
        },
        tokens_seen=instr.local_steps * instr.batch_size * instr.seq_len,
        n_tokens=data.n_tokens(),
        loss=sum(losses) / len(losses),
        scale=float(lora.scale.detach()),
        k=instr.k,
        seconds=time.perf_counter() - t0,
    )


@torch.no_grad()
def evaluate_at(
    lora: LoRAMoE,
    data: TokenData,
    ks: Sequence[int],
    *,
    batches: int,
    batch_size: int,
    seq_len: int,
    scale: float = 1.0,
    seed: int = 1234,
) -> dict[str, float]:
    """Mean validation cross-entropy per domain at each budget in ``ks``, with output scale
    ``scale``, on the same seeded batches for every ``k``: ``val_loss/<domain>/k<k>``."""
    lora.eval()
    before = float(lora.scale)
    lora.scale.fill_(scale)
    model = lora.model[0]
    out: dict[str, float] = {}
    try:
        for domain in data.domains:
            gen = torch.Generator().manual_seed(seed)
            rows = [data.sample(batch_size, seq_len, gen, domain=domain) for _ in range(batches)]
            for k in ks:
                with budget(model, k):
                    losses = [float(_ce(lora, b)[0]) for b in rows]
                out[f"val_loss/{domain}/k{k}"] = sum(losses) / len(losses)
    finally:
        lora.scale.fill_(before)
    return out

"""Federated LoRA fine-tuning of the MoE with per-client expert budgets (FLAME, arXiv 2506.16600).

The pure parts, no Ray: adapters and budgets (:mod:`.lora`), strategies (:mod:`.strategy`),
round policies (:mod:`.rounds`), client config (:mod:`.config`), the non-IID data split
(:mod:`.partition`) and the local training step (:mod:`.local`). The client actor is
:mod:`expertmesh.actors.fed_client`; the server is :mod:`expertmesh.pipelines.federated`.
"""

"""Federated LoRA fine-tuning with per-client expert budgets (FLAME); registers the merged model.

    python -m expertmesh.pipelines.federated --model NAME[/VERSION] \\
        [--clients configs/federated.yaml] [--rounds R] [--strategy flame|fedavg] [--t T]

One Ray actor per client (:mod:`expertmesh.actors.fed_client`) holds the frozen model and its
own data partition, and trains LoRA adapters on every expert at its budget k_i (experts per
token) plus its output scale s_i. Each round the strategy sends the global adapters out and
merges the updates that came back before the deadline (FedAvg, or FLAME's activation-aware
weights); a dead client is replaced before the next round, a late one is left out until it is
free. The adapters are then merged into the experts and the result registered as a plain
checkpoint (only expert files change, the rest is referenced in the parent) with its lineage:
any loader, and ``Cluster.upgrade``, can serve it. Every input is checked before a client starts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmesh import envs
from expertmesh.actors.fed_client import ClientActorSpec, start_client
from expertmesh.pipelines.finetune import check_tokenizer
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform import lineage, storage
from expertmesh.platform.config import to_dict
from expertmesh.platform.data import TokenData, read_manifest
from expertmesh.platform.data_share import stage
from expertmesh.platform.errors import ConfigError, DataError
from expertmesh.platform.federated.config import (
    DEFAULT_CLIENTS_FILE,
    FederationConfig,
    load_federation,
)
from expertmesh.platform.federated.local import evaluate_at
from expertmesh.platform.federated.lora import LoRAMoE, check_budget
from expertmesh.platform.federated.partition import Partition, check_domains, write_partitions
from expertmesh.platform.federated.rounds import (
    FederationError,
    RoundOutcome,
    close_round,
    participants,
)
from expertmesh.platform.federated.strategy import (
    ClientSpec,
    ClientUpdate,
    FedAvg,
    adapter_bytes,
    make_strategy,
)
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.tracking import ModelVersionInfo, Tracker
from expertmesh.platform.training import register_checkpoint

EVAL_KS = (1, 2, 4)
MERGE_TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32 (x A^T) B^T against x (W + B A)^T
# Called after a round's tasks went out, with the round and the live actors by client name
# (tests kill one here to fail a client mid-round).
RoundHook = Callable[[int, dict[str, Any]], None]


@dataclass(kw_only=True, slots=True)
class FederatedOptions:
    model: str  # registry name[/version] or name@alias
    clients: str = DEFAULT_CLIENTS_FILE
    rounds: int | None = None  # overrides of the clients file's knobs
    strategy: str | None = None
    t: float | None = None
    local_steps: int | None = None
    seed: int | None = None
    deadline_s: float | None = None
    min_clients: int | None = None
    # every client's GPU request, replacing the file's (the same clients on a GPU cluster)
    gpus_per_client: float | None = None
    data: str | None = None  # prepared data dir; default: the parent's
    partitions_dir: str | None = None  # default: <EXPERTMESH_HOME>/federated/<digest>
    cache_dir: str | None = None  # the source packages; default: beside the data, else the home's
    register_as: str | None = None
    experiment: str = "expertmesh"
    tracking_uri: str | None = None
    checkpoint_root: str | None = None
    ray_address: str | None = None
    on_round_dispatched: RoundHook | None = None


@dataclass(kw_only=True, slots=True)
class FederatedResult:
    model_version: ModelVersionInfo
    checkpoint_uri: str
    run_id: str
    rounds: list[RoundOutcome]
    metrics: dict[str, float]  # the last round's server metrics
    client_scales: dict[str, float]
    own_k_loss: dict[str, float]  # legal validation loss per client at its own k and s_i
    bytes_per_round: float
    seconds_per_round: float
    client_runs: dict[str, str] = field(default_factory=dict)


def _overridden(fed: FederationConfig, opts: FederatedOptions) -> FederationConfig:
    changes = {
        f: getattr(opts, f)
        for f in ("rounds", "strategy", "t", "local_steps", "seed", "deadline_s", "min_clients")
        if getattr(opts, f) is not None
    }
    if opts.gpus_per_client is not None:
        if not opts.gpus_per_client >= 0:  # NaN too
            raise ConfigError("gpus_per_client", f"must be >= 0, got {opts.gpus_per_client}")
        gpus = opts.gpus_per_client
        changes["clients"] = tuple(dataclasses.replace(c, num_gpus=gpus) for c in fed.clients)
    return dataclasses.replace(fed, **changes) if changes else fed


def _check_budgets(fed: FederationConfig, model_cfg) -> None:
    for c in fed.clients:
        try:
            check_budget(model_cfg, c.k, field=f"{c.where}.k")
        except ConfigError as exc:
            raise ConfigError(exc.field, f"client {c.name!r}: {exc.reason}") from None


def _check_resources(fed: FederationConfig) -> None:
    """A client asking for more CPUs or GPUs than the whole cluster has would wait forever."""
    import ray

    total = ray.cluster_resources()
    for c in fed.clients:
        for key, want in (("CPU", c.num_cpus), ("GPU", c.num_gpus)):
            if want > total.get(key, 0):
                raise ConfigError(
                    f"{c.where}.num_{key.lower()}s",
                    f"client {c.name!r} asks for {want} {key}s; the cluster has {total.get(key, 0)}",
                )


def _eval_ks(fed: FederationConfig, model_cfg) -> list[int]:
    fewest = min(model_cfg.experts_in(layer) for layer in model_cfg.moe_layers)
    return sorted({k for k in (*EVAL_KS, *(c.k for c in fed.clients)) if k <= fewest})


class _Clients:
    """The live client actors: start, replace the dead, remember stragglers' pending tasks."""

    def __init__(self, specs: dict[str, ClientActorSpec], run_tag: str) -> None:
        self.specs, self.run_tag = specs, run_tag
        self.actors: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}  # client -> a late task's ref, still running
        self.replaced: dict[str, int] = {name: 0 for name in specs}

    def start(self, names: list[str], timeout_s: float) -> dict[str, dict]:
        import ray

        for n in names:
            self.actors[n] = start_client(self.specs[n], name=f"fed-{self.run_tag}-{n}")
        refs = {n: self.actors[n].ready.remote() for n in names}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for n, ref in refs.items():
            if ref not in ready:
                raise FederationError(f"client {n!r} did not start within {timeout_s:.0f} s")
            try:
                out[n] = ray.get(ref)
            except Exception as exc:
                raise FederationError(f"client {n!r} could not start: {exc}") from None
        return out

    def replace(self, name: str, timeout_s: float) -> None:
        import ray

        with _suppress():
            ray.kill(self.actors[name])
        self.pending.pop(name, None)
        self.replaced[name] += 1
        self.actors[name] = start_client(
            self.specs[name], name=f"fed-{self.run_tag}-{name}-r{self.replaced[name]}"
        )
        try:
            ray.get(self.actors[name].ready.remote(), timeout=timeout_s)
        except Exception as exc:
            raise FederationError(f"client {name!r} could not be replaced: {exc}") from None

    def busy(self) -> list[str]:
        import ray

        if not self.pending:
            return []
        done, _ = ray.wait(list(self.pending.values()), num_returns=len(self.pending), timeout=0)
        for n in [n for n, ref in self.pending.items() if ref in done]:
            del self.pending[n]  # a straggler's result from an earlier round: thrown away
        return list(self.pending)

    def stop(self) -> None:
        import ray

        for actor in self.actors.values():
            with _suppress():
                ray.kill(actor)


def _suppress():
    import contextlib

    return contextlib.suppress(Exception)


def _run_round(
    server_round: int,
    fed: FederationConfig,
    strategy: FedAvg,
    clients: _Clients,
    specs: dict[str, ClientSpec],
    global_adapters,
    scales: dict[str, float],
    hook: RoundHook | None,
) -> tuple[RoundOutcome, list[ClientUpdate]]:
    import ray
    from ray.exceptions import RayActorError

    names, busy = participants(list(specs), clients.busy())
    instrs = strategy.configure_train(
        server_round, global_adapters, [specs[n] for n in names], scales
    )
    refs = {i.client: clients.actors[i.client].train.remote(i) for i in instrs}
    if hook is not None:
        hook(server_round, {n: clients.actors[n] for n in names})
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=fed.deadline_s)
    updates, dead, failed, late = [], [], [], []
    for n, ref in refs.items():
        if ref not in ready:
            late.append(n)
            clients.pending[n] = ref
            continue
        try:
            updates.append(ray.get(ref))
        except RayActorError:
            dead.append(n)
        except Exception as exc:  # the client's own error: left out, named in the log
            print(f"round {server_round}: client {n!r} failed: {exc}", file=sys.stderr)
            failed.append(n)
    outcome = close_round(
        server_round,
        reported=[u.client for u in updates],
        dead=dead,
        failed=failed,
        late=late,
        busy=busy,
        min_clients=fed.quorum,
    )
    return outcome, updates


def federate(opts: FederatedOptions) -> FederatedResult:
    """Check every input, run the rounds on Ray actors, merge, verify and register the result."""
    fed = _overridden(load_federation(opts.clients), opts)
    strategy = make_strategy(
        fed.strategy,
        t=fed.t,
        local_steps=fed.local_steps,
        lr=fed.lr,
        batch_size=fed.batch_size,
        seq_len=fed.seq_len,
        seed=fed.seed,
    )
    tracker = Tracker(opts.tracking_uri)
    tracker.check_reachable()
    try:
        parent = tracker.resolve_model(opts.model)
    except LookupError as exc:
        raise ConfigError("model", str(exc.args[0])) from None
    parent_ref = f"{parent.name}/{parent.version}"
    parent_uri = ckpt.resolve(parent.source)
    manifest = ckpt.read_manifest(parent_uri)
    _check_budgets(fed, manifest.config)
    ref = opts.data or parent.tags.get("data_uri")
    if not ref:
        raise ConfigError("data", f"{parent_ref} records no training data; pass --data DIR")
    try:
        data_dir, data_uri = stage(ref)
    except DataError as exc:
        raise ConfigError("data", str(exc)) from None
    check_domains(fed, data_dir)
    check_tokenizer(data_dir, manifest, parent_ref)
    cache_dir = opts.cache_dir or _cache_dir(data_dir)
    from expertmesh.platform.federated.partition import partition_digest

    digest = partition_digest(fed, data_dir)
    part_dir = opts.partitions_dir or str(envs.home() / "federated" / digest[:16])
    partitions = write_partitions(fed, data_dir=data_dir, cache_dir=cache_dir, out_dir=part_dir)
    base_domains = [d for d in parent.tags.get("domains", "").split(",") if d]
    prepared_val = set(read_manifest(data_dir).get("splits", {}).get("validation", {}))
    val_domains = [d for d in dict.fromkeys(["legal", *base_domains]) if d in prepared_val]
    if not val_domains:
        raise ConfigError("data", f"{data_dir} has no validation split to measure the rounds on")

    from expertmesh.runtime import LocalRayOptions, init_ray

    cpus = max(4, math.ceil(sum(c.num_cpus for c in fed.clients)) + 1)
    owns_ray = init_ray(opts.ray_address, LocalRayOptions(num_cpus=cpus))
    try:
        _check_resources(fed)
        return _federate(opts, fed, strategy, tracker, parent, manifest, partitions, data_dir,
                         data_uri, val_domains, digest)  # fmt: skip
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def _cache_dir(data_dir: str) -> str:
    """Where the source packages are cached: beside the prepared data (``.state/cache`` next
    to ``.state/data``, the layout ``prepare`` is given by default) when there, else the home's."""
    sibling = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "cache")
    return sibling if os.path.isdir(os.path.join(sibling, "pkgs")) else str(envs.home() / "cache")


def _federate(
    opts: FederatedOptions,
    fed: FederationConfig,
    strategy: FedAvg,
    tracker: Tracker,
    parent: ModelVersionInfo,
    manifest: ckpt.Manifest,
    partitions: dict[str, Partition],
    data_dir: str,
    data_uri: str,
    val_domains: list[str],
    digest: str,
) -> FederatedResult:
    parent_ref = f"{parent.name}/{parent.version}"
    parent_uri = ckpt.resolve(parent.source)
    name = opts.register_as or parent.name
    run_tag = uuid.uuid4().hex[:8]
    base: MoETransformer = ckpt.load_model(parent_uri)[0].eval()
    lora = LoRAMoE(base, fed.lora)
    global_adapters = lora.adapters()
    val = TokenData.load(data_dir, val_domains, "validation")
    ks = _eval_ks(fed, manifest.config)
    specs = {
        c.name: ClientSpec(name=c.name, k=c.k, n_tokens=partitions[c.name].n_tokens)
        for c in fed.clients
    }
    actor_specs = {
        c.name: ClientActorSpec(
            name=c.name,
            checkpoint_uri=parent_uri,
            partition_dir=partitions[c.name].path,
            domain=partitions[c.name].domain,
            lora=fed.lora,
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
        )
        for c in fed.clients
    }
    scales = {c.name: 1.0 for c in fed.clients}
    budgets = ",".join(f"{c.name}:{c.k}" for c in fed.clients)
    record = lineage.Lineage(
        pipeline="federated",
        parent=parent_ref,
        trained_parts=f"experts (LoRA r={fed.lora.rank} on w1/w3/w2, merged)",
        domains=sorted({p.domain for p in partitions.values()}),
        data_digest=digest,
        config_digest=lineage.digest(to_dict(fed)),
        ray_job_id=lineage.ray_job_id(),
        git_revision=lineage.git_revision(),
        data_uri=data_uri,
    )
    eval_kw = {"batches": fed.eval_batches, "batch_size": fed.batch_size, "seq_len": fed.seq_len}
    clients = _Clients(actor_specs, run_tag)
    outcomes: list[RoundOutcome] = []
    round_bytes, round_secs = [], []
    metrics: dict[str, float] = {}
    with tracker.run(opts.experiment, run_name="federated") as run_id:
        tracker.log_params(
            {
                "strategy": strategy.name,
                "t": fed.t if strategy.name == "flame" else 0,
                "rounds": fed.rounds,
                "local_steps": fed.local_steps,
                "lr": fed.lr,
                "batch_size": fed.batch_size,
                "seq_len": fed.seq_len,
                "lora_rank": fed.lora.rank,
                "lora_alpha": fed.lora.alpha,
                "deadline_s": fed.deadline_s,
                "min_clients": fed.quorum,
                "budgets": budgets,
                "parent_checkpoint": parent_uri,
                "partitions": part_dir_of(partitions),
            }
            | record.tags()
        )
        client_runs: dict[str, str] = {}
        for c in fed.clients:
            p = partitions[c.name]
            with tracker.run(opts.experiment, run_name=f"client-{c.name}") as cid:
                tracker.log_params(
                    {"client": c.name, "k": c.k, "domain": p.domain, "docs": p.n_docs}
                    | {"tokens": p.n_tokens, "categories": ",".join(c.categories or [])}
                    | {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus}
                )
                tracker.log_dataset(
                    name=f"partition-{c.name}",
                    digest=digest,
                    source=p.path,
                    profile={"docs": p.n_docs, "tokens": p.n_tokens, "domain": p.domain},
                )
                client_runs[c.name] = cid
        tracker.log_metrics(
            {f"{k}": v for k, v in evaluate_at(lora, val, ks, **eval_kw).items()}, 0
        )
        try:
            clients.start(list(specs), timeout_s=fed.deadline_s)
            for server_round in range(1, fed.rounds + 1):
                t0 = time.perf_counter()
                for n in [n for n in outcomes[-1].dead] if outcomes else []:
                    clients.replace(n, timeout_s=fed.deadline_s)
                outcome, updates = _run_round(
                    server_round, fed, strategy, clients, specs, global_adapters, scales,
                    opts.on_round_dispatched,
                )  # fmt: skip
                agg = strategy.aggregate_train(server_round, global_adapters, updates)
                global_adapters = agg.adapters
                lora.load_adapters(global_adapters)
                for u in updates:
                    scales[u.client] = u.scale
                n_sent = len(outcome.reported) + len(outcome.dead + outcome.failed + outcome.late)
                sent = adapter_bytes(global_adapters) * n_sent + sum(
                    adapter_bytes(u.delta) for u in updates
                )
                secs = time.perf_counter() - t0
                metrics = evaluate_at(lora, val, ks, **eval_kw) | agg.metrics
                metrics |= {
                    "clients_reported": len(outcome.reported),
                    "clients_dropped": len(outcome.dropped),
                    "round_seconds": secs,
                    "bytes_sent": sent,
                }
                tracker.log_metrics(metrics, server_round)
                if outcome.dropped:
                    tracker.set_tags({f"dropped_round_{server_round}": ",".join(outcome.dropped)})
                _log_clients(tracker, opts.experiment, client_runs, updates, server_round)
                outcomes.append(outcome)
                round_bytes.append(sent)
                round_secs.append(secs)
                print(
                    f"round {server_round}: {len(outcome.reported)} reported, dropped "
                    f"{outcome.dropped or 'none'}, {secs:.1f} s, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/legal/" in k)
                )
        finally:
            clients.stop()
        own_k = {
            c.name: evaluate_at(lora, val, [c.k], scale=scales[c.name], **eval_kw).get(
                f"val_loss/legal/k{c.k}", float("nan")
            )
            for c in fed.clients
            if "legal" in val.domains
        }
        tracker.log_metrics({f"own_k_val_loss/{n}": v for n, v in own_k.items()}, fed.rounds)
        merged = _merge_and_verify(lora, base, fed.batch_size, fed.seq_len, val)
        uri = ckpt.save_checkpoint(
            f"{storage.checkpoint_root(opts.checkpoint_root)}/{name}/federated-{run_tag}",
            f"round-{fed.rounds:04d}",
            merged,
            tokenizer_path=f"{data_dir}/tokenizer.json",
            version={"rounds": fed.rounds, "run_id": run_id, "strategy": strategy.name},
            parent=parent_uri,
        )
        _verify_written(uri, manifest)
        tags = record.tags() | {
            "rounds": str(fed.rounds),
            "clients": ",".join(specs),
            "budgets": budgets,
            "strategy": strategy.name + (f"(t={fed.t})" if strategy.name == "flame" else ""),
            "client_scales": ",".join(f"{n}:{s:.4f}" for n, s in scales.items()),
            "n_experts": str(manifest.config.n_experts),
        }
        mv = register_checkpoint(tracker, name, source=uri, run_id=run_id, tags=tags)
        tracker.set_tags({"registered_version": mv.version})
    return FederatedResult(
        model_version=mv,
        checkpoint_uri=uri,
        run_id=run_id,
        rounds=outcomes,
        metrics=metrics,
        client_scales=dict(scales),
        own_k_loss=own_k,
        bytes_per_round=sum(round_bytes) / len(round_bytes),
        seconds_per_round=sum(round_secs) / len(round_secs),
        client_runs=client_runs,
    )


def part_dir_of(partitions: dict[str, Partition]) -> str:
    return os.path.dirname(next(iter(partitions.values())).path)


def _log_clients(
    tracker: Tracker,
    experiment: str,
    client_runs: dict[str, str],
    updates: list[ClientUpdate],
    server_round: int,
) -> None:
    """Each reporting client's round in its own nested run: loss, k, tokens, activations."""
    for u in updates:
        with tracker.run(experiment, run_id=client_runs[u.client]):
            m = {
                "local_loss": u.loss,
                "k": u.k,
                "tokens_seen": u.tokens_seen,
                "scale": u.scale,
                "train_seconds": u.seconds,
            }
            for layer in u.counts:
                for e, f in enumerate(u.frequencies(layer).tolist()):
                    m[f"activation/L{layer}/E{e}"] = f
            tracker.log_metrics(m, server_round)
            tracker.log_dict(
                {str(layer): c.tolist() for layer, c in u.counts.items()},
                f"activations/round-{server_round:04d}.json",
            )


@torch.no_grad()
def _merge_and_verify(
    lora: LoRAMoE, base: MoETransformer, batch_size: int, seq_len: int, val: TokenData
) -> MoETransformer:
    """The base model with the adapters folded into its experts, checked against the adapted
    model on a validation batch (at the model's own top_k and s = 1, what it will serve)."""
    merged = lora.merge_into(copy.deepcopy(base)).eval()
    batch = val.sample(batch_size, seq_len, torch.Generator().manual_seed(0))[:, :-1]
    lora.eval()
    with_scale = float(lora.scale)
    lora.scale.fill_(1.0)
    try:
        torch.testing.assert_close(merged(batch).logits, lora(batch).logits, **MERGE_TOL)
    except AssertionError as exc:
        raise FederationError(f"the merged experts do not reproduce the adapters: {exc}") from None
    finally:
        lora.scale.fill_(with_scale)
    return merged


def _verify_written(uri: str, parent: ckpt.Manifest) -> None:
    """Only expert files were written: the dense part is the parent's, referenced not copied."""
    written = {p for p, f in ckpt.read_manifest(uri).files.items() if f.path is None}
    unexpected = {p for p in written if p.endswith(".safetensors") and p != ckpt.DENSE}
    unexpected -= {ckpt.expert_file(layer, e) for layer, e in parent.config.expert_keys()}
    if ckpt.DENSE in written or unexpected:
        raise FederationError(f"the federation changed more than the experts: {sorted(written)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="expertmesh.pipelines.federated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registered NAME[/VERSION] or NAME@ALIAS")
    p.add_argument("--clients", default=DEFAULT_CLIENTS_FILE, help="the clients YAML file")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--strategy", default=None, choices=["flame", "fedavg"])
    p.add_argument("--t", type=float, default=None, help="FLAME's activation exponent")
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deadline-s", type=float, default=None, help="per-round client deadline")
    p.add_argument("--min-clients", type=int, default=None, help="reports a round needs")
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=None,
        help="every client's GPU request (default: each client's num_gpus in the file)",
    )
    p.add_argument("--data", default=None, help="prepared data dir (default: the parent's)")
    p.add_argument("--partitions-dir", default=None, help="where client partitions are written")
    p.add_argument("--register-as", default=None, help="registered model name (default: parent's)")
    p.add_argument("--experiment", default="expertmesh")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the cluster's)")
    p.add_argument(
        "--checkpoint-root", default=None, help="pyarrow.fs URI (default: the cluster's)"
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = FederatedOptions(
        model=args.model,
        clients=args.clients,
        rounds=args.rounds,
        strategy=args.strategy,
        t=args.t,
        local_steps=args.local_steps,
        seed=args.seed,
        deadline_s=args.deadline_s,
        min_clients=args.min_clients,
        gpus_per_client=args.gpus_per_client,
        data=args.data,
        partitions_dir=args.partitions_dir,
        register_as=args.register_as,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        checkpoint_root=args.checkpoint_root,
        ray_address=args.address,
    )
    try:
        result = federate(opts)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FederationError as exc:  # a lost quorum, a client that cannot start
        print(f"federation failed: {exc}", file=sys.stderr)
        return 1
    mv = result.model_version
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"mlflow run: {result.run_id}")
    for k in sorted(result.metrics):
        if k.startswith("val_loss/"):
            print(f"{k}: {result.metrics[k]:.4f}")
    for n, loss in result.own_k_loss.items():
        print(f"client {n}: legal loss at its own k {loss:.4f} (s = {result.client_scales[n]:.3f})")
    print(f"registered: {mv.name} version {mv.version} (parent {mv.tags['parent']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

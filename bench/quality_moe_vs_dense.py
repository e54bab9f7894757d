"""Quality at equal compute per token: a dense model against an MoE with the same active parameters.

Both models are decoders of ``configs/tiny.yaml``'s kind (RMSNorm, RoPE, grouped-query
attention with 32-wide heads, SwiGLU, vocab 4096), by default of width 128 with 4 layers and 4
query / 2 key-value heads, and differ only in the feed-forward block of every layer:

- ``moe``: 8 SwiGLU experts of width F = 352, top-2 routing, so each token runs through
  2 x 352 = 704 hidden units;
- ``dense``: one SwiGLU of width 704 (``n_experts=1`` and ``moe_every`` past the last layer, so
  every layer is a plain dense FFN).

A SwiGLU of width F holds 3 * d_model * F weights, so two experts of width F hold exactly as
many as one FFN of width 2F: the models' *active* parameters (and FLOPs per token) are equal up
to the MoE's gate (d_model x 8 per layer). The MoE holds about 2.4x the *total* parameters; the
Switch Transformer and GLaM papers report that this extra capacity lowers the loss at equal
compute. The bench checks that claim on the two base domains.

Why this size and not ``configs/tiny.yaml``'s (width 256, experts of 704; ``--d-model 256
--expert-ff 704``): the claim is about capacity, and capacity only counts once a model has seen
enough tokens for its size. Two cores train tiny.yaml's shape on ~1.5 M tokens in 20 minutes,
0.2 tokens per active parameter; there the MoE was level with dense (three seeds at 600 steps of
1024 tokens: -0.005, +0.034, +0.016 nats; at 1500 steps +0.000). At width 128 about the same
time per pair goes through 4.9 M tokens (1200 steps of 32 x 128, as many tokens as the training
split holds, drawn at random), 2.1 tokens per active parameter. The MoE trails early (+0.03
nats of training loss at 200 steps) and in most seeds passes dense at ~600 steps and ends below
it; not in every seed (docs/results.md lists them): the seed moves the gap by about as much as
the gap itself.

Both runs go through :func:`expertmesh.platform.training.train`, the real ``train_step``, so
the MoE's load-balancing and z losses are part of what it optimises. Their weights default to
0.001 and 0.0003 here:
- with Switch's 0.01 and 0.001 the MoE trailed dense by a steady 0.013 nats, the price of
  forcing balance on a model this small;
- at 0.003 it led by 0.011 on average over 5 CPU and 8 GPU seeds, and was behind in 1 of the 5
  and 2 of the 8;
- at 0.001 it led by 0.024 over 8 GPU seeds (behind in 1), and on the CPU in every seed run
  (docs/results.md). One expert per layer then takes ~47 % of the assignments; the bench prints
  how balanced the routing is.

Both models use the same seed, the same batches in the same order, the same AdamW and the same
warmup-cosine schedule. The validation cross-entropy per domain comes from :func:`evaluate` on
the same fixed, seeded validation batches; the unigram entropy of each domain's validation
tokens is printed as a reference (a model that learnt only token frequencies would score about
that).

``--balance-bias-rate`` gives the MoE auxiliary-loss-free balancing instead of (or besides) the
loss: a per-expert bias on the gate logits that only chooses experts, moved after every step
towards equal load (``ModelConfig.balance_bias_rate``; DeepSeek-V3).

Both runs are logged to MLflow, experiment ``bench-quality``. Unless ``EXPERTMESH_HOME`` is set,
the MLflow store goes to a fresh folder under /tmp (printed), not the demo's ``.state``.

Run: ``.venv/bin/python bench/quality_moe_vs_dense.py`` (about 22 minutes on 2 idle cores with
the defaults; ``--seed`` for another draw of weights and batches, ``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import machine_line  # bench/ is on sys.path (the script's folder)

from expertmesh.platform.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from expertmesh.platform.data import TokenData, prepare
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import train

EXPERIMENT = "bench-quality"
D_MODEL, N_LAYERS, N_EXPERTS, TOP_K, EXPERT_FF = 128, 4, 8, 2, 352


@dataclass(kw_only=True, slots=True)
class Result:
    model: str
    total_params: int
    active_params: int
    val_loss: dict[str, float]  # domain -> mean validation cross-entropy (nats/token)
    train_s: float
    run_id: str
    aux_loss: float | None = None  # last training batch, mean over layers (1.0: uniform)
    busiest: float | None = None  # largest share of a layer's assignments one expert took
    max_bias: float | None = None  # largest |selection bias| over layers (balance_bias_rate > 0)

    @property
    def mean(self) -> float:
        return sum(self.val_loss.values()) / len(self.val_loss)


def model_configs(
    aux_loss_weight: float = 0.001,
    z_loss_weight: float = 3e-4,
    routed_scale: float = 1.0,
    balance_bias_rate: float = 0.0,
    *,
    d_model: int = D_MODEL,
    n_layers: int = N_LAYERS,
    expert_ff: int = EXPERT_FF,
) -> dict[str, ModelConfig]:
    """The two models; the dense FFN is as wide as the top-k experts a token runs through.

    Heads keep the tiny model's head width of 32 (4 query heads per 2 key-value heads at
    d_model 128, 8 per 4 at 256).
    """
    n_heads = max(1, d_model // 32)
    shape = {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": max(1, n_heads // 2),
    }
    dense_ff = TOP_K * expert_ff
    return {
        "dense": ModelConfig(
            **shape,
            d_ff=dense_ff,
            d_ff_dense=dense_ff,
            n_experts=1,
            top_k=1,
            moe_every=n_layers + 1,  # no layer is an MoE layer
        ),
        "moe": ModelConfig(
            **shape,
            d_ff=expert_ff,
            n_experts=N_EXPERTS,
            top_k=TOP_K,
            aux_loss_weight=aux_loss_weight,
            z_loss_weight=z_loss_weight,
            routed_scale=routed_scale,
            balance_bias_rate=balance_bias_rate,
        ),
    }


def param_counts(cfgs: dict[str, ModelConfig]) -> dict[str, tuple[int, int]]:
    """(total, active) parameters per model; raises unless the MoE's active parameters equal the
    dense model's plus the gate weights."""
    counts: dict[str, tuple[int, int]] = {}
    for name, cfg in cfgs.items():
        model = MoETransformer(cfg)
        counts[name] = (model.num_parameters(), model.num_parameters(active=True))
    moe_cfg = cfgs["moe"]
    gates = len(moe_cfg.moe_layers) * moe_cfg.d_model * moe_cfg.n_experts
    dense, moe_active = counts["dense"][1], counts["moe"][1]
    if moe_active != dense + gates:
        raise RuntimeError(
            f"active parameters differ: moe {moe_active} != dense {dense} + gates {gates}"
        )
    return counts


def run_one(
    name: str,
    model: ModelConfig,
    data: DataConfig,
    counts: tuple[int, int],
    args: argparse.Namespace,
    tracker: Tracker,
    checkpoint_root: Path,
) -> Result:
    """Train ``model`` for ``args.steps`` steps and evaluate it on the validation batches."""
    tc = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=min(50, args.steps // 10),
        eval_every=args.steps,  # evaluate once, at the end
        eval_batches=args.eval_batches,
        checkpoint_every=args.steps,
        log_every=25,
        seed=args.seed,
        threads=args.threads,
        output_dir=str(checkpoint_root / name),
        experiment=EXPERIMENT,
    )
    cfg = ExperimentConfig(model=model, data=data, train=tc)
    t0 = time.perf_counter()
    res = train(cfg, tracker=tracker, resume=False, progress=False, register=False)
    train_s = time.perf_counter() - t0
    tracker.client.update_run(res.run_id, name=f"{name}-{args.steps}steps")
    tracker.client.set_tag(res.run_id, "bench.model", name)
    logged = tracker.client.get_run(res.run_id).data.metrics  # latest value of each key
    loads = [v for k, v in logged.items() if k.startswith("load/")]
    biases = [v for k, v in logged.items() if k.startswith("expert_bias_max_abs/")]
    return Result(
        aux_loss=res.metrics.get("aux_loss") if model.n_experts > 1 else None,
        busiest=max(loads) if loads and model.n_experts > 1 else None,
        max_bias=max(biases) if biases else None,
        model=name,
        total_params=counts[0],
        active_params=counts[1],
        val_loss={d: res.metrics[f"val_loss/{d}"] for d in data.train_domains},
        train_s=train_s,
        run_id=res.run_id,
    )


def format_table(results: list[Result], entropy: dict[str, float]) -> str:
    """Side-by-side validation losses, then MoE - dense and MoE / dense, then the entropy row."""
    domains = list(entropy)
    header = ["model", "total params", "active params", *(f"val/{d}" for d in domains), "mean"]
    rows = [
        [
            r.model,
            f"{r.total_params:,}",
            f"{r.active_params:,}",
            *(f"{r.val_loss[d]:.4f}" for d in domains),
            f"{r.mean:.4f}",
        ]
        for r in results
    ]
    by = {r.model: r for r in results}
    moe, dense = by["moe"], by["dense"]
    moe_losses = [*(moe.val_loss[d] for d in domains), moe.mean]
    dense_losses = [*(dense.val_loss[d] for d in domains), dense.mean]
    diff = [m - d for m, d in zip(moe_losses, dense_losses, strict=True)]
    ratio = [m / d for m, d in zip(moe_losses, dense_losses, strict=True)]
    rows.append(["moe - dense", "", "", *(f"{x:+.4f}" for x in diff)])
    rows.append(["moe / dense", "", "", *(f"{x:.4f}" for x in ratio)])
    mean_entropy = sum(entropy.values()) / len(entropy)
    rows.append(
        ["unigram entropy", "", "", *(f"{entropy[d]:.4f}" for d in domains), f"{mean_entropy:.4f}"]
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *map(line, rows[:2]), sep, *map(line, rows[2:])])


def main() -> None:
    print(machine_line())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--steps",
        type=int,
        default=1200,
        help="training steps per model (1200 x 32 x 128: as many tokens as the training split)",
    )
    p.add_argument("--batch", type=int, default=32, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (both models)")
    p.add_argument(
        "--aux-loss-weight",
        type=float,
        default=0.001,
        help="MoE load-balancing loss weight (0.01, Switch's, cost 0.013 nats here; 0.003 "
        "gave half the lead of 0.001)",
    )
    p.add_argument("--z-loss-weight", type=float, default=3e-4, help="MoE router z-loss weight")
    p.add_argument(
        "--routed-scale",
        type=float,
        default=1.0,
        help="MoE combined-output scale (ModelConfig.routed_scale; top_k matches dense at init)",
    )
    p.add_argument(
        "--balance-bias-rate",
        type=float,
        default=0.0,
        help="MoE auxiliary-loss-free balancing step (ModelConfig.balance_bias_rate; 0: off)",
    )
    p.add_argument("--d-model", type=int, default=D_MODEL, help="model width (both models)")
    p.add_argument("--layers", type=int, default=N_LAYERS, help="decoder layers (both models)")
    p.add_argument(
        "--expert-ff",
        type=int,
        default=EXPERT_FF,
        help=f"MoE expert width F; the dense FFN is {TOP_K} x F wide",
    )
    p.add_argument("--models", default="dense,moe", help="which models to train (comma-separated)")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=64,
        help="validation batches per domain (64 x 32 x 128: ~262 k tokens each)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=".state/test-data", help="prepared data (made if absent)")
    p.add_argument("--cache-dir", default=".state/cache", help="downloaded source packages")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()

    t_start = time.perf_counter()
    if "EXPERTMESH_HOME" not in os.environ:  # keep bench runs out of the demo's MLflow registry
        os.environ["EXPERTMESH_HOME"] = tempfile.mkdtemp(prefix="expertmesh-bench-quality-")
    data = DataConfig(data_dir=args.data_dir, cache_dir=args.cache_dir)
    prepare(data)
    val = TokenData.load(data.data_dir, data.train_domains, "validation")
    entropy = {d: val.unigram_entropy(d) for d in data.train_domains}
    cfgs = model_configs(
        args.aux_loss_weight,
        args.z_loss_weight,
        args.routed_scale,
        args.balance_bias_rate,
        d_model=args.d_model,
        n_layers=args.layers,
        expert_ff=args.expert_ff,
    )
    counts = param_counts(cfgs)
    wanted = args.models.split(",")
    if unknown := sorted(set(wanted) - set(cfgs)):
        p.error(f"--models: unknown {unknown}; choose from {sorted(cfgs)}")
    tracker = Tracker()
    print(f"MLflow: {tracker.uri} (experiment {EXPERIMENT!r})")
    print(
        f"d_model {args.d_model}, {args.layers} layers, expert width {args.expert_ff}; "
        f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, lr {args.lr}, "
        f"seed {args.seed}, {args.threads} threads; eval {args.eval_batches} batches per domain; "
        f"MoE load-balancing weight {args.aux_loss_weight}, z-loss weight {args.z_loss_weight}, "
        f"routed scale {args.routed_scale}, balance bias rate {args.balance_bias_rate}"
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="expertmesh-bench-ckpt-") as ckpt_root:
        for name, model in cfgs.items():
            if name not in wanted:
                continue
            r = run_one(name, model, data, counts[name], args, tracker, Path(ckpt_root))
            print(f"  {name}: trained and evaluated in {r.train_s:.0f} s (run {r.run_id})")
            results.append(r)
    print()
    if len(results) == 2:
        print(format_table(results, entropy))
        by = {r.model: r for r in results}
        met = by["moe"].mean < by["dense"].mean
        print(
            f"target: the MoE reaches the lower mean validation loss: "
            f"{'met' if met else 'MISSED'} ({by['moe'].mean - by['dense'].mean:+.4f} nats)"
        )
    for r in results:
        print(f"{r.model}: " + ", ".join(f"val/{d} {v:.4f}" for d, v in r.val_loss.items()))
    for r in results:
        if r.aux_loss is not None and r.busiest is not None:
            print(
                f"{r.model} routing, last training batch: load-balancing loss {r.aux_loss:.3f} "
                f"(1.0 = uniform), busiest expert {r.busiest:.1%} of its layer's assignments "
                f"(uniform {1 / N_EXPERTS:.1%})"
                + ("" if r.max_bias is None else f", largest |selection bias| {r.max_bias:.3f}")
            )
    wall_s = time.perf_counter() - t_start
    print(f"\nwall time {wall_s:.0f} s")
    if args.out:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "unigram_entropy": entropy,
            "results": [asdict(r) | {"mean": r.mean} for r in results],
            "wall_s": wall_s,
            "mlflow_uri": tracker.uri,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

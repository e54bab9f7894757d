"""One MoE layer (eval, no_grad, top-k router) against three yardsticks, measured side by side.

For each token count and dtype it times, interleaved over several rounds (median per call):

- ``ours``: ``expertmesh`` :class:`MoELayer` (gate, route, permute, run_experts, combine);
- ``hf``: transformers' ``MixtralSparseMoeBlock`` holding the same weights (outputs checked equal
  first), with both of its CPU expert implementations, ``eager`` and ``grouped_mm``; the faster
  one is the baseline;
- ``dense``: the same useful FLOPs with no routing: N*k rows through one D->2F GEMM, SwiGLU and
  one F->D GEMM;
- ``bound``: the time to read the weights of the experts the batch touches at the machine's read
  bandwidth, measured in the same rounds by summing a buffer far larger than the caches;
- ``cold``: ours again, but each call on the next of :data:`COLD_LAYERS` layers with their own
  weights, as a decode step runs them, so every call finds its experts' weights evicted by the
  other layers' (the ``ours`` column calls one layer again and again, and how much of its
  weights the 32 MB L3 still holds then varies with the machine's other load: at 16 tokens
  that read 0.6-1.0 of the bound on the same code). The bandwidth target compares the bound
  with ``cold``, both reading from memory.

Ratios are ``other_time / ours``: above 1 means the MoE layer is faster.

Run: ``.venv/bin/python bench/moe_layer.py`` (about a minute on 2 cores). ``--device cuda``
runs every column on the GPU (each timed batch of calls ends with a synchronize; the read
bandwidth is a sum over a buffer many times the GPU's L2).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine import machine_line  # bench/ is on sys.path (the script's folder)
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from expertmesh.platform.config import ModelConfig
from expertmesh.platform.model.moe import MoELayer

D_MODEL, D_FF, N_EXPERTS, TOP_K = 512, 1408, 8, 2
COLD_LAYERS = 4  # 3 other layers' experts (207 MB in float32) pass between two calls of one
HF_IMPLS = ("eager", "grouped_mm")
BW_BUFFER_BYTES = 512 * 2**20  # 16x the 32 MiB L3 of the reference machine
BW_BUFFER_BYTES_CUDA = 4 * 2**30  # ~70x an H100/H200's 50-60 MB L2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(kw_only=True, slots=True)
class Row:
    tokens: int
    dtype: str
    ours_s: float
    cold_s: float  # ours, each call on the next of COLD_LAYERS layers (weights evicted)
    hf_s: dict[str, float]
    dense_s: float
    dense_f32_s: float  # the same dense GEMMs in float32: the machine's best GEMM for bf16 rows
    bound_s: float  # reading the experts a call touches (mean over the cold layers) from memory
    read_gbps: float
    experts_touched: float
    max_abs_err: float


def build_ours(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> MoELayer:
    """An expertmesh MoE layer with seeded random weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, top_k=TOP_K, n_heads=8, n_kv_heads=4
    )
    ours = MoELayer(cfg, layer=0)
    assert ours.experts is not None
    # unit-scale activations, so that equality checks below compare numbers of size ~1
    ours.experts.reset_parameters(std=D_MODEL**-0.5, out_std=D_FF**-0.5)
    return ours.to(device, dtype).eval()


def build_layers(
    dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> tuple[MoELayer, dict[str, torch.nn.Module]]:
    """An expertmesh MoE layer and transformers Mixtral blocks (one per impl) with equal weights."""
    ours = build_ours(dtype, seed, device)
    assert ours.experts is not None
    hf = {}
    for impl in HF_IMPLS:
        hf_cfg = MixtralConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            hidden_act="silu",
        )
        hf_cfg._experts_implementation = impl
        block = MixtralSparseMoeBlock(hf_cfg).to(device, dtype).eval()
        with torch.no_grad():
            block.gate.weight.copy_(ours.gate.weight)
            # transformers 5 stores the experts fused exactly like ExpertBank: gate_up_proj is
            # cat(w1, w3) as (E, 2F, D) and down_proj is (E, D, F)
            block.experts.gate_up_proj.copy_(ours.experts.w13)
            block.experts.down_proj.copy_(ours.experts.w2)
        hf[impl] = block
    return ours, hf


def dense_ffn(w13_FD: torch.Tensor, w2_DF: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same useful FLOPs with no routing: one D->2F GEMM, SwiGLU, one F->D GEMM."""

    def run(x_RD: torch.Tensor) -> torch.Tensor:
        gate_RF, up_RF = F.linear(x_RD, w13_FD).chunk(2, dim=-1)
        return F.linear(F.silu(gate_RF) * up_RF, w2_DF)

    return run


def interleaved_median(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int,
    budget_s: float,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so load hits all alike;
    ``sync`` waits for queued device work (CUDA) before each clock read."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():  # warm-up call doubles as a probe of how long one call takes
        fn()  # the first call may compile or allocate
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - t0
        calls[name] = max(1, min(50, int(budget_s / rounds / len(fns) / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            fn = fns[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_one(
    tokens: int, dtype_name: str, bw_buf: torch.Tensor, budget_s: float, device: str = "cpu"
) -> Row:
    dtype = DTYPES[dtype_name]
    ours, hf = build_layers(dtype, device=device)
    assert ours.experts is not None
    x_BTD = torch.randn(1, tokens, D_MODEL).to(device, dtype)

    y_ours, _ = ours(x_BTD)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = 0.0
    for impl, block in list(hf.items()):
        try:
            y_hf = block(x_BTD)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. grouped_mm on this device/dtype
            print(f"  transformers {impl} does not run here ({dtype_name}): {exc}", flush=True)
            del hf[impl]
            continue
        err = max(err, (y_ours.float() - y_hf.float()).abs().max().item())
        if not torch.allclose(y_ours.float(), y_hf.float(), rtol=tol, atol=tol):
            raise AssertionError(f"{impl} output differs from ours: max abs err {err:.3g}")

    cold = [ours] + [build_ours(dtype, seed, device) for seed in range(1, COLD_LAYERS)]
    touched = statistics.mean(int((layer(x_BTD)[1].counts_E > 0).sum()) for layer in cold)
    turn = itertools.cycle(cold)
    w13, w2 = ours.experts.w13.detach(), ours.experts.w2.detach()
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    dense = dense_ffn(w13[0], w2[0])
    x_RD = x_BTD.reshape(tokens, D_MODEL).repeat_interleave(TOP_K, dim=0)  # N*k rows
    dense_f32 = dense_ffn(w13[0].float(), w2[0].float())
    x_RD_f32 = x_RD.float()

    fns: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(x_BTD),
        "cold": lambda: next(turn)(x_BTD),
        **{f"hf_{impl}": (lambda b=block: b(x_BTD)) for impl, block in hf.items()},
        "dense": lambda: dense(x_RD),
        **({} if dtype == torch.float32 else {"dense_f32": lambda: dense_f32(x_RD_f32)}),
        "read": lambda: bw_buf.sum(),
    }
    rounds = 7
    sync = torch.cuda.synchronize if x_BTD.is_cuda else (lambda: None)
    t = interleaved_median(fns, rounds=rounds, budget_s=budget_s, sync=sync)
    bandwidth = bw_buf.numel() * bw_buf.element_size() / t["read"]
    return Row(
        tokens=tokens,
        dtype=dtype_name,
        ours_s=t["ours"],
        cold_s=t["cold"],
        hf_s={impl: t[f"hf_{impl}"] for impl in hf},
        dense_s=t["dense"],
        dense_f32_s=t.get("dense_f32", t["dense"]),
        bound_s=touched * expert_bytes / bandwidth,
        read_gbps=bandwidth / 1e9,
        experts_touched=touched,
        max_abs_err=err,
    )


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'tokens':>6} {'dtype':>8} {'ours ms':>9} {'hf ms':>9} {'hf impl':>10} {'hf/ours':>8}"
        f" {'dense/ours':>10} {'dense32/ours':>12} {'cold ms':>8} {'bound/cold':>10} {'experts':>7} {'read GB/s':>9} {'hf eager/ours':>13}"
        f" {'max|err|':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        impl = min(r.hf_s, key=r.hf_s.__getitem__)
        hf_s = r.hf_s[impl]
        print(
            f"{r.tokens:>6} {r.dtype:>8} {r.ours_s * 1e3:>9.3f} {hf_s * 1e3:>9.3f} {impl:>10}"
            f" {hf_s / r.ours_s:>8.2f} {r.dense_s / r.ours_s:>10.2f}"
            f" {r.dense_f32_s / r.ours_s:>12.2f} {r.cold_s * 1e3:>8.3f} {r.bound_s / r.cold_s:>10.2f}"
            f" {r.experts_touched:>7.2f} {r.read_gbps:>9.1f} {r.hf_s['eager'] / r.ours_s:>13.2f} {r.max_abs_err:>9.2g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 4096])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=4.0, help="timing seconds per row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on the machine skew every column alike
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("highest")  # float32 rows in float32, not TF32
    bw_bytes = BW_BUFFER_BYTES_CUDA if cuda else BW_BUFFER_BYTES
    bw_buf = torch.ones(bw_bytes // 4, device=args.device)
    rows = []
    with torch.no_grad():
        for dtype_name in args.dtypes:
            for tokens in args.tokens:
                rows.append(bench_one(tokens, dtype_name, bw_buf, args.budget_s, args.device))
                print(f"  done {tokens} tokens {dtype_name}", flush=True)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(
        f"\nMoE layer d={D_MODEL} f={D_FF} E={N_EXPERTS} top-{TOP_K}, "
        f"{where}; ratios are other_time / ours (>= 1: ours faster)"
    )
    print(machine_line())
    print_table(rows)
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Decode attention: the native one-pass kernel against the PyTorch path, measured side by side.

Two measurements, each interleaved over rounds (medians, ratio ``torch / native``: above 1 means
the kernel is faster):

1. The op alone (``layers.decode_attention``) at a decode step's shape for ``configs/tiny.yaml``
   (B=64 sequences, 8 query heads over 4 key/value heads of 32) and L cached positions, on 1 and
   2 threads, with the KV cache warm (the same call repeated) and cold (a 64 MiB buffer written
   between calls, as the expert weights and other layers push the cache out of L3 between two
   steps of one layer).
2. A whole decode wave of the engine (64 requests of 32 prompt tokens, 64 new tokens each; the
   dense part only: experts are replaced by the identity) in child processes alternating between
   ``EXPERTMESH_NATIVE_KERNELS=1`` and ``=0``: CPU milliseconds per step.

Run: ``.venv/bin/python bench/decode_attention.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from expertmesh.platform.model import kernels
from expertmesh.platform.model.layers import decode_attention

B, H, G, K, MAX_LEN = 64, 8, 4, 32, 512
FLUSH_BYTES = 64 * 2**20


def op_times(L: int, threads: int, rounds: int, cold: bool) -> tuple[float, float, float]:
    """Median seconds per call (torch path, native) and the max |difference| of their outputs."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(L)
    k_buf, v_buf = torch.randn(2, B, G, MAX_LEN, K, generator=g)
    q = torch.randn(B, H, K, generator=g)
    pos = torch.randint(max(0, L - 32), L, (B,), generator=g)
    pos[0] = L - 1
    future = torch.arange(L)[None, None, :] > pos[:, None, None]
    k, v = k_buf[:, :, :L], v_buf[:, :, :L]
    flush = torch.empty(FLUSH_BYTES // 4)
    calls = {
        "torch": lambda: decode_attention(q, k, v, future),
        "native": lambda: decode_attention(q, k, v, future, pos + 1),
    }
    err = (calls["torch"]() - calls["native"]()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            if cold:
                flush.add_(1.0)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["torch"]), statistics.median(times["native"]), err


WAVE_CHILD = """
import sys, time, torch
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.engine import Engine
from expertmesh.platform.sampling import SamplingParams
torch.set_num_threads(int(sys.argv[2]))
model, tok = load_for_inference(sys.argv[1], with_experts=False)
class Identity:  # the dense part only: each MoE layer's experts return their input
    def dispatch(self, layer, x, routing):
        return x.clone()
eng = Engine(model, tok, dispatcher=Identity(), max_batch=64)
p = SamplingParams(max_tokens=64, ignore_eos=True)
for wave in range(2):  # the first one warms up
    for i in range(64):
        eng.add(list(range(10 + i + wave, 42 + i + wave)), p)
    t, n = time.thread_time(), 0
    while eng.has_work():
        eng.step()
        n += 1
print((time.thread_time() - t) / n)
"""


def wave_times(uri: str, threads: int, rounds: int) -> tuple[float, float]:
    """Median CPU seconds per step of a decode wave: (torch path, native)."""
    times: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(rounds):
        for flag in times:
            env = {**os.environ, "EXPERTMESH_NATIVE_KERNELS": flag}
            out = subprocess.run(
                [sys.executable, "-c", WAVE_CHILD, uri, str(threads)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            times[flag].append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times["0"]), statistics.median(times["1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="32,64,96,128", help="cached positions L")
    p.add_argument("--rounds", type=int, default=40, help="calls per path and cell (op)")
    p.add_argument("--wave-rounds", type=int, default=3, help="child processes per path")
    p.add_argument("--model", default="expertmesh-tiny", help="registry name or checkpoint URI")
    p.add_argument("--skip-wave", action="store_true")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args()
    if not kernels.available():
        sys.exit("the native kernels are not available here (no compiler, or no AVX2/FMA)")
    results: dict[str, object] = {"op": [], "wave": []}
    print(f"decode attention, B={B}, {H} query heads over {G} key/value heads of {K}, float32")
    print(f"{'L':>5} {'threads':>7} {'cache':>5} {'torch ms':>9} {'native ms':>9} {'ratio':>6}")
    for L in [int(x) for x in args.lengths.split(",")]:
        for threads in (1, 2):
            for cold in (False, True):
                t_torch, t_native, err = op_times(L, threads, args.rounds, cold)
                cache = "cold" if cold else "warm"
                print(
                    f"{L:>5} {threads:>7} {cache:>5} {1e3 * t_torch:>9.3f} "
                    f"{1e3 * t_native:>9.3f} {t_torch / t_native:>5.2f}x   max|diff| {err:.1e}"
                )
                results["op"].append(
                    dict(L=L, threads=threads, cache=cache, torch_s=t_torch, native_s=t_native)
                )
    if not args.skip_wave:
        from expertmesh.platform.loader import resolve_model

        uri = resolve_model(args.model).checkpoint_uri
        print("\nengine decode wave (dense part), CPU ms per step, child processes alternating")
        for threads in (1, 2):
            t_torch, t_native = wave_times(uri, threads, args.wave_rounds)
            print(
                f"  threads {threads}: torch path {1e3 * t_torch:.2f}  native "
                f"{1e3 * t_native:.2f}  ratio {t_torch / t_native:.2f}x"
            )
            results["wave"].append(dict(threads=threads, torch_s=t_torch, native_s=t_native))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

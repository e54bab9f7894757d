"""What one Ray actor call costs here: the floor under every shard call of the distributed engine.

Echo actors on local Ray (the same options as expert shards: 0.25 CPU, threaded with
max_concurrency 4, and a plain one for comparison) receive and return a (16, 256) float32 array,
the size of one shard's slice of a decode step. Prints milliseconds per round of calls to 1 and to
4 actors at once, and the ratio: when 4 concurrent calls take ~4x one call, the per-call cost is
CPU (serialisation, the task path), not waiting.

    .venv/bin/python bench/ray_rpc.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray

from expertmesh.runtime import LocalRayOptions, init_ray


class Echo:
    def run(self, x: np.ndarray) -> np.ndarray:
        return x


def per_round_ms(handles: list, x: np.ndarray, rounds: int) -> float:
    ray.get([h.run.remote(x) for h in handles])  # warm
    t0 = time.perf_counter()
    for _ in range(rounds):
        ray.get([h.run.remote(x) for h in handles])
    return (time.perf_counter() - t0) / rounds * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    init_ray(None, LocalRayOptions())
    x = np.zeros((16, 256), np.float32)
    for label, opts in {
        "threaded (as shards)": {"num_cpus": 0.25, "max_concurrency": 4},
        "plain": {"num_cpus": 0.25},
    }.items():
        cls = ray.remote(Echo).options(**opts)
        one = per_round_ms([cls.remote()], x, args.rounds)
        four = per_round_ms([cls.remote() for _ in range(4)], x, args.rounds)
        print(
            f"{label:<22} 1 actor {one:6.2f} ms/round   4 actors {four:6.2f} ms/round   "
            f"4-actor/1-actor {four / one:4.2f}x"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()

"""What one shard call costs here: Ray actor calls against the direct channel, side by side.

Echo actors on local Ray (the same options as expert shards: 0.25 CPU, threaded with
max_concurrency 4, and a plain one for comparison) receive and return a (16, 256) float32 array,
the size of one shard's slice of a decode step, as a Ray actor call and over the direct channel
(:mod:`expertmesh.actors.channel`, which the same actors serve). Prints milliseconds per round of
calls to 1 and to 4 actors at once, the 4-actor/1-actor ratio (when 4 concurrent calls take ~4x
one call, the per-call cost is CPU, not waiting), and Ray call / channel per round.

    .venv/bin/python bench/ray_rpc.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
from machine import machine_line  # bench/ is on sys.path (the script's folder)

from expertmesh.actors.channel import ChannelServer, Endpoint, ShardChannel
from expertmesh.runtime import LocalRayOptions, init_ray


class Echo:
    def __init__(self) -> None:
        self.server = ChannelServer(lambda layer, x, experts, counts: x)

    def run(self, x: np.ndarray) -> np.ndarray:
        return x

    def endpoint(self) -> Endpoint:
        return self.server.endpoint()


def per_round_ms(handles: list, x: np.ndarray, rounds: int) -> float:
    ray.get([h.run.remote(x) for h in handles])  # warm
    t0 = time.perf_counter()
    for _ in range(rounds):
        ray.get([h.run.remote(x) for h in handles])
    return (time.perf_counter() - t0) / rounds * 1e3


def channel_round_ms(handles: list, x: np.ndarray, rounds: int) -> float:
    channels = [ShardChannel(ep) for ep in ray.get([h.endpoint.remote() for h in handles])]
    for _ in range(rounds + 1):  # the first round warms up
        if _ == 1:
            t0 = time.perf_counter()
        for ch in channels:
            ch.send(0, [x], [0], [x.shape[0]])
        for ch in channels:
            ch.receive(10.0)
    ms = (time.perf_counter() - t0) / rounds * 1e3
    for ch in channels:
        ch.close()
    return ms


def main() -> None:
    print(machine_line())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    init_ray(None, LocalRayOptions())
    x = np.zeros((16, 256), np.float32)
    times: dict[tuple[str, str], tuple[float, float]] = {}
    for label, opts in {
        "threaded (as shards)": {"num_cpus": 0.25, "max_concurrency": 4},
        "plain": {"num_cpus": 0.25},
    }.items():
        cls = ray.remote(Echo).options(**opts)
        single, quad = [cls.remote()], [cls.remote() for _ in range(4)]
        for how, fn in (("ray call", per_round_ms), ("channel", channel_round_ms)):
            one, four = fn(single, x, args.rounds), fn(quad, x, args.rounds)
            times[(label, how)] = (one, four)
            print(
                f"{label:<22} {how:<9} 1 actor {one:6.3f} ms/round   4 actors {four:6.3f} "
                f"ms/round   4-actor/1-actor {four / one:4.2f}x"
            )
    for label in ("threaded (as shards)", "plain"):
        (r1, r4), (c1, c4) = times[(label, "ray call")], times[(label, "channel")]
        print(f"{label:<22} ray call/channel: 1 actor {r1 / c1:5.1f}x   4 actors {r4 / c4:5.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Serve a registered model on the current Ray cluster until stopped.

``python -m expertmesh.pipelines.serve --model expertmesh-tiny --shards 4`` — submittable with
``ray job submit`` (it joins the job's cluster). On KubeRay, serving is a RayService instead
(k8s/base/rayservice.yaml, expertmesh.api.serve_app): a job's driver is not redeployed when it
or the head dies.
It deploys the model (router + shard actors + controller), starts the HTTP API and keeps the job
alive; SIGTERM (``ray job stop``) tears the deployment down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import expertmesh


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh.pipelines.serve", description=__doc__)
    p.add_argument("--model", default="expertmesh-tiny", help="registry name[/version] or URI")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPU fraction per shard")
    p.add_argument("--host", default="127.0.0.1", help="API bind address (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--autoscale", action="store_true", help="size the shard pool from load")
    p.add_argument(
        "--max-shards",
        type=int,
        default=16,
        help="most shards a scale request or the autoscaler may ask for",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cluster = expertmesh.connect(args.address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.deploy(
            args.model,
            shards=args.shards,
            replicas=args.replicas,
            num_gpus=args.num_gpus,
            max_shards=args.max_shards,
        )
        if args.autoscale:
            cluster.autoscale(min_shards=args.replicas, max_shards=args.max_shards)
        url = cluster.serve(host=args.host, port=args.port)
        print(f"serving {args.model} at {url}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

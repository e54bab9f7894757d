"""``expertmesh`` command line: a thin layer over the SDK and the pipelines.

expertmesh up [--model NAME_OR_URI] [--shards 4] [--replicas 2] [--max-shards N] [--port 8000]
              [--foreground]
expertmesh status [--json]
expertmesh generate "prompt" [--max-tokens N] [--temperature T] [--stream] [--json]
expertmesh scale N [--no-wait] [--timeout S]
expertmesh upgrade NAME/VER
expertmesh down
expertmesh data prepare | train [--workers N]
expertmesh submit PIPELINE [ARGS] | jobs | job status|logs|stop ID | lineage NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from expertmesh.types import DEFAULT_MAX_QUEUED

if TYPE_CHECKING:
    from expertmesh.service import UpOptions


def _data_prepare(args: argparse.Namespace) -> int:
    from expertmesh.platform.config import load_config
    from expertmesh.platform.data import prepare

    cfg = load_config(args.config, args.set)
    out = prepare(cfg.data, progress=not args.no_progress)
    print(f"prepared data in {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from expertmesh.pipelines import train

    overrides = [arg for item in args.set for arg in ("--set", item)]
    on_ray = [] if args.workers is None else ["--workers", str(args.workers)]
    if args.gpus_per_worker is not None:
        on_ray += ["--gpus-per-worker", str(args.gpus_per_worker)]
    return train.main(["--config", args.config, *overrides, *on_ray])


# ---------------------------------------------------------------------- serving commands
def _up_options(args: argparse.Namespace) -> UpOptions:
    from expertmesh.service import UpOptions

    return UpOptions(
        model=args.model,
        shards=args.shards,
        replicas=args.replicas,
        warm_shards=args.warm_shards,
        max_shards=args.max_shards,
        max_queued=args.max_queued,
        max_concurrent_per_token=args.max_concurrent_per_token,
        host=args.host,
        port=args.port,
        token=args.token,
        timeout_s=args.timeout,
        dashboard_port=args.dashboard_port,
    )


def _up(args: argparse.Namespace) -> int:
    from expertmesh import service

    if args.foreground:
        return service.run_foreground(_up_options(args))
    rec = service.start_background(_up_options(args))
    print(f"expertmesh is up: API {rec.url} (pid {rec.pid}, log {service.log_file()})")
    print(f"token: {rec.token}")
    print(f"try:   curl -H 'Authorization: Bearer <token>' {rec.url}/v1/models")
    return 0


def _status(args: argparse.Namespace) -> int:
    from expertmesh import service

    status = service.attach().status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from expertmesh import service

    cluster = service.attach()
    params: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stop": args.stop or None,
        "seed": args.seed,
        "ignore_eos": args.ignore_eos,
    }
    if args.stream:
        for piece in cluster.stream(args.prompt, **params):
            print(piece, end="", flush=True)
        print()
        return 0
    out = cluster.generate(args.prompt, **params)
    print(json.dumps(asdict(out)) if args.json else out.text)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from expertmesh import service

    out = service.attach().scale(args.shards, wait=not args.no_wait, timeout_s=args.timeout)
    if args.no_wait:
        print(f"{out['scale_id']}: {out['from']} -> {out['to']} shards started (see the events)")
        return 0
    print(f"{out['scale']['scale_id']}: {out['scale']['message']}")
    print(format_status(out))
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from expertmesh import service

    out = service.attach().upgrade(args.model)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    up = out.get("upgraded") or {}
    print(
        f"upgraded {up.get('from')} -> {up.get('to')} in {up.get('seconds', 0):.1f}s: "
        f"{up.get('files_loaded')} expert files loaded ({up.get('bytes_loaded')} of "
        f"{up.get('expert_bytes')} bytes), {up.get('dropped')} old weights dropped"
    )
    print(format_status(out))
    return 0


def _down(args: argparse.Namespace) -> int:
    from expertmesh import service

    pid = service.stop_background(timeout_s=args.timeout)
    print(f"expertmesh is down (pid {pid} exited)")
    return 0


def format_status(status: dict[str, Any]) -> str:
    """A compact view: the model, one row per shard, and a layer x expert grid of
    ``replicas/tokens served``."""
    nodes = status.get("nodes") or []
    alive = sum(1 for n in nodes if n.get("alive"))
    lines = [
        f"model {status.get('model')}  version {status.get('version') or '-'}  "
        f"placement v{status.get('placement_version')}  "
        f"nodes {alive}/{len(nodes)} alive  min replicas {status.get('min_replicas')}"
    ]
    router = status.get("router") or {}
    if "steps" in router:
        lines.append(
            f"router: {router['tokens_generated']} tokens in {router['steps']} steps, "
            f"{router['running']} running, {router['waiting']} waiting, "
            f"p50 {router['latency_p50_s'] * 1000:.0f} ms"
        )
    lines.append(f"{'SHARD':<7}{'NODE':<10}{'PID':>8}{'EXPERTS':>9}{'TOKENS':>9}{'STATE':>10}")
    for sh in status.get("shards", []):
        state = "error" if "error" in sh else "draining" if sh.get("draining") else "ok"
        tokens = sum((sh.get("tokens_served") or {}).values())
        lines.append(
            f"{sh['shard_id']:<7}{sh.get('node_id', '')[:8]:<10}{sh.get('pid', '-')!s:>8}"
            f"{len(sh.get('experts') or []):>9}{tokens:>9}{state:>10}"
        )
    placement: dict[str, list[str]] = status.get("placement") or {}
    load: dict[str, int] = status.get("expert_load") or {}
    keys = [tuple(map(int, k.split(":"))) for k in placement]
    layers = sorted({k[0] for k in keys})
    n_experts = 1 + max((k[1] for k in keys), default=-1)
    if layers:
        lines.append("experts (replicas/tokens): " + " ".join(f"E{e:<8}" for e in range(n_experts)))
        for layer in layers:
            cells = []
            for e in range(n_experts):
                key = f"{layer}:{e}"
                cells.append(f"{len(placement.get(key, []))}/{load.get(key, 0)}".ljust(9))
            lines.append(f"{'layer ' + str(layer):<27}" + " ".join(cells))
    return "\n".join(lines)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Elastic MoE on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="configs/tiny.yaml")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="download domains and write Parquet token shards")
    with_config(prep)
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=_data_prepare)

    tr = sub.add_parser("train", help="train a model (runs expertmesh.pipelines.train)")
    with_config(tr)
    tr.add_argument("--workers", type=int, help="train on Ray Train with N DDP workers")
    tr.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker")
    tr.set_defaults(func=_train)

    up = sub.add_parser("up", help="start local Ray, deploy a model and serve the HTTP API")
    up.add_argument("--model", default="expertmesh-tiny", help="registry name[/version] or URI")
    up.add_argument("--shards", type=int, default=4, help="expert shard actors")
    up.add_argument("--replicas", type=int, default=2, help="copies of every expert")
    up.add_argument(
        "--warm-shards",
        type=int,
        default=1,
        help="spare shard actors kept started for fast scale-out and healing",
    )
    up.add_argument(
        "--max-shards",
        type=int,
        default=None,
        help="most shards `scale` (and autoscaling) may ask for (default: what the cluster fits)",
    )
    up.add_argument(
        "--max-queued",
        type=_non_negative,
        default=DEFAULT_MAX_QUEUED,
        help="sequences that may wait for a router slot; beyond, requests get 429 + Retry-After",
    )
    up.add_argument(
        "--max-concurrent-per-token",
        type=_positive,
        default=None,
        help="completion requests one API token may have in flight; beyond: 429 (default: no "
        "limit)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address the API binds (loopback)")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--token", default=None, help="API token (default: EXPERTMESH_TOKEN/random)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for start")
    up.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="also start Ray's dashboard on this port (needed by `ray job submit`; ~1 GB)",
    )
    up.add_argument(
        "--foreground", action="store_true", help="serve in this process until SIGTERM/Ctrl-C"
    )
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="shards, experts, replicas and load of the running API")
    st.add_argument("--json", action="store_true", help="print the full status as JSON")
    st.set_defaults(func=_status)

    gen = sub.add_parser("generate", help="complete a prompt on the running API")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--json", action="store_true", help="print the completion as JSON")
    gen.set_defaults(func=_generate)

    sc = sub.add_parser("scale", help="grow or shrink the expert shard pool, live")
    sc.add_argument("shards", type=int)
    sc.add_argument(
        "--no-wait", action="store_true", help="print the scale's id and return at once"
    )
    sc.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the scale to finish"
    )
    sc.set_defaults(func=_scale)

    upg = sub.add_parser(
        "upgrade", help="serve another registered version live (rollback: the parent version)"
    )
    upg.add_argument("model", help="registered NAME/VERSION, e.g. expertmesh-tiny/2")
    upg.add_argument("--json", action="store_true", help="print the result as JSON")
    upg.set_defaults(func=_upgrade)

    down = sub.add_parser("down", help="stop what `expertmesh up` started")
    down.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for exit")
    down.set_defaults(func=_down)

    from expertmesh import cli_jobs

    cli_jobs.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from expertmesh.platform.errors import ExpertmeshError

        if isinstance(exc, ExpertmeshError | LookupError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

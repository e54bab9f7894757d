"""``expertmesh submit | jobs | job | lineage``: pipelines as Ray jobs, and model lineage.

expertmesh submit [--address URL] [--working-dir DIR] [--no-wait] PIPELINE [ARGS...]
expertmesh jobs [--address URL]
expertmesh job status|logs|stop JOB_ID [--address URL]
expertmesh lineage NAME [--json] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime


def _client(args: argparse.Namespace):  # -> JobClient
    from expertmesh import envs
    from expertmesh.jobs import JobClient

    return JobClient(args.address or envs.ray_job_address())


def _submit(args: argparse.Namespace) -> int:
    client = _client(args)
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    job = client.submit(args.pipeline, extra, working_dir=args.working_dir)
    print(f"job {job.submission_id} submitted: {job.entrypoint}", flush=True)
    if args.no_wait:
        return 0
    job = client.follow(job.submission_id, lambda text: print(text, end="", flush=True))
    print(f"job {job.submission_id} {job.status}" + (f": {job.message}" if job.message else ""))
    return 0 if job.status == "SUCCEEDED" else 1


def _jobs(args: argparse.Namespace) -> int:
    print(f"{'JOB':<32}{'STATUS':<11}{'PIPELINE':<10}{'STARTED':<20}ENTRYPOINT")
    for job in _client(args).list():
        started = (
            datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
            if job.start_time
            else "-"
        )
        print(
            f"{job.submission_id:<32}{job.status:<11}{job.pipeline or '-':<10}{started:<20}"
            f"{job.entrypoint}"
        )
    return 0


def _job(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "logs":
        print(client.logs(args.job_id), end="")
    elif args.action == "stop":
        print(f"job {args.job_id}: " + ("stopping" if client.stop(args.job_id) else "not running"))
    else:
        print(json.dumps(asdict(client.info(args.job_id)), indent=2))
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from expertmesh.platform.lineage import format_tree, lineage_tree
    from expertmesh.platform.tracking import Tracker

    versions = Tracker(args.tracking_uri).versions(args.name)
    if not versions:
        print(f"error: no registered model named {args.name!r}", file=sys.stderr)
        return 2
    roots = lineage_tree(versions)
    print(json.dumps([r.to_dict() for r in roots], indent=2) if args.json else format_tree(roots))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add these commands to the ``expertmesh`` parser's subcommands."""

    def with_address(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address",
            default=None,
            help="the job server (Ray dashboard) URL; default RAY_API_SERVER_ADDRESS, "
            "RAY_ADDRESS, else http://127.0.0.1:8265",
        )

    sm = sub.add_parser(
        "submit", help="run a pipeline (train, finetune, ...) as a Ray job on the cluster"
    )
    with_address(sm)
    sm.add_argument("--working-dir", default=None, help="upload this checkout to run (e.g. .)")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted")
    sm.add_argument("pipeline", help="a module of expertmesh.pipelines, e.g. finetune")
    sm.add_argument("args", nargs=argparse.REMAINDER, help="the pipeline's own arguments")
    sm.set_defaults(func=_submit)

    js = sub.add_parser("jobs", help="the cluster's jobs, newest first")
    with_address(js)
    js.set_defaults(func=_jobs)

    jb = sub.add_parser("job", help="one job's status, logs, or stop it")
    jb.add_argument("action", choices=["status", "logs", "stop"])
    jb.add_argument("job_id")
    with_address(jb)
    jb.set_defaults(func=_job)

    ln = sub.add_parser("lineage", help="a registered model's versions as a lineage tree")
    ln.add_argument("name")
    ln.add_argument("--json", action="store_true")
    ln.add_argument("--tracking-uri", default=None, help="MLflow store (default: as pipelines)")
    ln.set_defaults(func=_lineage)

"""Pipelines as Ray jobs: a thin layer over Ray's :class:`~ray.job_submission.JobSubmissionClient`.

A pipeline is a module ``expertmesh.pipelines.NAME`` run as ``python -m`` by the job's driver,
on the cluster's Python (the environment that started it). The job finds the cluster's MLflow
store and checkpoint root by itself (:mod:`expertmesh.published`), so a job submitted here, by
``expertmesh submit`` or by a plain ``ray job submit`` lands in the same store. Submitting
adds only what the cluster cannot know: the code's git revision, and explicit overrides.

Example::

    jobs = JobClient("http://127.0.0.1:8265")
    job = jobs.submit("finetune", pipeline_args(model="tiny", train="router", steps=50))
    print(jobs.wait(job.submission_id).status)
"""

from __future__ import annotations

import asyncio
import pkgutil
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from expertmesh.platform.errors import ConfigError, ExpertmeshError

PIPELINE_PREFIX = "expertmesh.pipelines."
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# NOTE: never uploaded: state (databases, checkpoints, Ray's sockets) and environments
WORKING_DIR_EXCLUDES = [".git", ".state", ".venv", "node_modules", "__pycache__"]


class JobError(ExpertmeshError):
    """A job could not be submitted, found or followed; the message says why."""


def pipelines() -> list[str]:
    """Names of the runnable pipelines (modules of ``expertmesh.pipelines``)."""
    import expertmesh.pipelines as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def pipeline_args(**args: Any) -> list[str]:
    """Keyword arguments as a pipeline's flags: ``steps=3`` -> ``--steps 3``, ``True`` -> a bare
    flag, ``None``/``False`` -> nothing, a list -> comma-joined (``set=[...]`` repeats
    ``--set``)."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif key == "set":
            for item in [value] if isinstance(value, str) else value:
                out += [flag, str(item)]
        elif isinstance(value, list | tuple):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def entrypoint(pipeline: str, args: Sequence[str]) -> str:
    """The job's shell command; ``python`` is the cluster's (first on its PATH)."""
    if pipeline not in pipelines():
        raise ConfigError("pipeline", f"unknown pipeline {pipeline!r}; known: {pipelines()}")
    return shlex.join(["python", "-m", PIPELINE_PREFIX + pipeline, *args])


@dataclass(kw_only=True, slots=True)
class JobInfo:
    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    entrypoint: str
    pipeline: str | None  # the expertmesh pipeline it runs, if any
    message: str | None
    start_time: int | None  # ms since the epoch
    end_time: int | None

    @classmethod
    def from_details(cls, d: Any) -> JobInfo:
        words = shlex.split(d.entrypoint or "")
        pipeline = next(
            (w.removeprefix(PIPELINE_PREFIX) for w in words if w.startswith(PIPELINE_PREFIX)),
            None,
        )
        return cls(
            submission_id=d.submission_id or d.job_id or "",
            status=str(getattr(d.status, "value", d.status)),
            entrypoint=d.entrypoint,
            pipeline=pipeline,
            message=d.message,
            start_time=d.start_time,
            end_time=d.end_time,
        )

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobClient:
    """Submit, follow, list and stop pipeline jobs on one Ray cluster's job server.

    Args:
        address: the job server (Ray dashboard) URL; None asks Ray (the dashboard of the
            cluster this process is connected to, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``).
    """

    def __init__(self, address: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise JobError(
                f"no Ray job server at {address or 'the default address'} ({exc}); start the "
                "cluster with its dashboard (`expertmesh up --dashboard-port 8265`, "
                "LocalRayOptions(dashboard=True)) or pass --address"
            ) from None
        self.address = address

    def submit(
        self,
        pipeline: str,
        args: Sequence[str] = (),
        *,
        working_dir: str | None = None,
        env_vars: Mapping[str, str] | None = None,
        submission_id: str | None = None,
    ) -> JobInfo:
        """Start ``python -m expertmesh.pipelines.<pipeline> ARGS`` as a job.

        ``working_dir`` (a local folder) travels with the job as Ray's ``working_dir`` (its
        state and environments excluded) and comes first on the job's import path; None runs
        the cluster's installed expertmesh. Its git revision travels along for lineage.
        """
        from expertmesh.platform.lineage import git_revision

        env = dict(env_vars or {})
        runtime_env: dict[str, Any] = {}
        if working_dir is not None:
            runtime_env = {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES}
            env.setdefault("EXPERTMESH_GIT_REVISION", git_revision(working_dir))
        env = {k: v for k, v in env.items() if v}
        if env:
            runtime_env["env_vars"] = env
        job_id = self.client.submit_job(
            entrypoint=entrypoint(pipeline, args),
            runtime_env=runtime_env or None,
            submission_id=submission_id,
        )
        return self.info(job_id)

    def info(self, job_id: str) -> JobInfo:
        try:
            return JobInfo.from_details(self.client.get_job_info(job_id))
        except RuntimeError as exc:
            raise JobError(f"no job {job_id!r} on this cluster ({exc})") from None

    def list(self) -> list[JobInfo]:
        """Every job the cluster knows, newest first."""
        jobs = [JobInfo.from_details(d) for d in self.client.list_jobs()]
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, out: Callable[[str], None]) -> JobInfo:
        """Pass the job's log to ``out`` as it is written, until the job ends."""

        async def tail() -> None:
            async for lines in self.client.tail_job_logs(job_id):
                out(lines)

        asyncio.run(tail())
        return self.wait(job_id, timeout_s=30.0)

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobInfo:
        """The job's info once it ended; JobError if it runs on past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not (info := self.info(job_id)).done:
            if time.monotonic() > deadline:
                raise JobError(f"job {job_id} still {info.status} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return info

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; True if it was running."""
        return self.client.stop_job(job_id)


__all__ = [
    "JobClient",
    "JobError",
    "JobInfo",
    "entrypoint",
    "pipeline_args",
    "pipelines",
]

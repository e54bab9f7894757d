"""The Python SDK: ``expertmesh.connect()`` returns a :class:`Cluster`.

Two transports, one surface: a driver inside the Ray cluster talks to the controller and router
actors directly; ``connect("http://...")`` talks to the HTTP API. Both offer the operations of
:class:`expertmesh.types.ClusterHandle`; deploying and serving need the Ray side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Unpack

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.sampling import SamplingParams
from expertmesh.runtime import LocalRayOptions
from expertmesh.types import (
    DEFAULT_MAX_QUEUED,
    ClusterError,
    Completion,
    Overloaded,
    RouterTuning,
    SamplingOptions,
    check_stream_options,
    iter_events,
    wait_for_scale,
)

if TYPE_CHECKING:
    from expertmesh.client import HttpCluster
    from expertmesh.jobs import JobClient, JobInfo
    from expertmesh.platform.lineage import VersionNode


def _sampling_params(sampling: SamplingOptions) -> dict[str, Any]:
    """The router's parameters for ``sampling``, checked; ConfigError names a bad key."""
    known = SamplingOptions.__annotations__
    if unknown := sorted(set(sampling) - set(known)):
        raise ConfigError(unknown[0], f"unknown sampling option; known: {', '.join(known)}")
    opts = dict(sampling)
    if opts.get("stop") is not None:
        opts["stop"] = tuple(opts["stop"])
    return asdict(SamplingParams(**{k: v for k, v in opts.items() if v is not None}))


class Cluster:
    """A handle on an expertmesh deployment inside a Ray cluster.

    It offers the :class:`~expertmesh.types.ClusterHandle` surface (as the HTTP-side
    :class:`~expertmesh.client.HttpCluster` does) plus deploying, serving and MLflow runs.
    """

    def __init__(self, *, owns_ray: bool) -> None:
        from expertmesh.actors.launch import get_controller

        self.owns_ray = owns_ray
        self.controller = get_controller(create=True)
        self._serve_url: str | None = None
        self.api_token: str | None = None  # the HTTP API's bearer token, once serve() ran

    def _call(self, method: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Call the controller, waiting out a restart (Ray restarts it if it dies)."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(getattr(self.controller, method).remote(*args))
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the expertmesh controller did not come back within {timeout_s:.0f}s"
                    ) from None
                time.sleep(0.2)

    # ------------------------------------------------------------------ deploy and scale
    def deploy(
        self,
        model: str,
        *,
        shards: int = 4,
        replicas: int = 2,
        num_cpus: float = 0.25,
        num_gpus: float = 0.0,
        resources: dict[str, float] | None = None,
        max_batch: int = 64,
        max_queued: int = DEFAULT_MAX_QUEUED,
        warm_shards: int = 1,
        max_shards: int | None = None,
        advanced: RouterTuning | None = None,
    ) -> dict[str, Any]:
        """Serve ``model`` (a checkpoint URI, or an MLflow registry ``name[/version]``).

        Args:
            model: a checkpoint URI, or a registered model ``name[/version]``.
            shards: expert shard actors the experts are spread over.
            replicas: copies of each expert, on different shards (nodes where possible).
            num_cpus: logical CPUs each shard asks Ray for (fractions allowed).
            num_gpus: GPUs each shard asks Ray for; > 0 runs its experts on the GPU.
            resources: custom Ray resources each shard asks for.
            max_batch: most sequences the router runs in one step.
            max_queued: most sequences that wait for one of those slots; a request beyond
                ``max_batch + max_queued`` is refused at once (:class:`~expertmesh.Overloaded`,
                HTTP 429 with ``Retry-After``), never left to hang.
            warm_shards: more shard actors kept started (holding no experts), so that scaling
                out and replacing a failed shard take an already running process.
            max_shards: the most shards :meth:`scale` (and the autoscaler) may ask for; a
                request above it is refused (None: only what the cluster can place bounds it).
            advanced: how the router runs (threads, micro-batches, transport to the shards);
                see :class:`~expertmesh.types.RouterTuning`. The defaults suit most machines.

        Example::

            cluster = expertmesh.connect()
            cluster.deploy("expertmesh-tiny", shards=4, replicas=2)
            print(cluster.generate("ROMEO.", max_tokens=32).text)
        """
        from expertmesh.actors.expert_shard import ShardResources
        from expertmesh.actors.state import DeploymentSpec
        from expertmesh.platform.loader import resolve_model

        if shards < 1:
            raise ClusterError(f"shards must be >= 1, got {shards}")
        if replicas < 1:
            raise ClusterError(f"replicas must be >= 1, got {replicas}")
        if warm_shards < 0:
            raise ClusterError(f"warm_shards must be >= 0, got {warm_shards}")
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise ClusterError(f"max_queued must be an integer >= 0, got {max_queued!r}")
        if advanced is None:
            advanced = RouterTuning()
        elif not isinstance(advanced, RouterTuning):
            raise TypeError(
                f"advanced must be an expertmesh.RouterTuning, got {type(advanced).__name__}"
            )
        resolved = resolve_model(model)
        spec = DeploymentSpec(
            model=resolved.name,
            checkpoint_uri=resolved.checkpoint_uri,
            version=None if resolved.version is None else resolved.version.version,
            shards=shards,
            min_replicas=replicas,
            shard_resources=ShardResources(
                num_cpus=num_cpus, num_gpus=num_gpus, resources=resources
            ),
            max_batch=max_batch,
            max_queued=max_queued,
            warm_shards=warm_shards,
            max_shards=max_shards,
            router=advanced,
        )
        out = self._call("deploy", spec)
        if resolved.version is not None:  # MLflow's alias says which version this cluster serves
            from expertmesh.platform.tracking import SERVING_ALIAS, Tracker

            Tracker().set_alias(resolved.name, SERVING_ALIAS, resolved.version.version)
        return out

    def set_max_queued(self, max_queued: int) -> None:
        """Change the deployed router's queue bound (``deploy``'s ``max_queued``), live; a
        router the controller restarts takes the deployment's again."""
        import ray

        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise ClusterError(f"max_queued must be an integer >= 0, got {max_queued!r}")
        ray.get(self._router().set_admission.remote(max_queued))

    def scale(self, shards: int, *, wait: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
        """Grow or shrink the expert shard pool to ``shards`` actors, live.

        The controller starts the scale and answers at once; a scale it cannot do is refused
        before anything starts. With ``wait`` this returns the status once the scale finished
        (its ``scale_finished`` event under ``"scale"``); else at once
        ``{"scale_id", "from", "to", "seq"}``: follow it with :meth:`events` ``(after_seq=seq - 1)``.

        Raises:
            ConfigError: below the deployment's ``min_replicas`` or above its ``max_shards``.
            CapacityError: more shards than the cluster can place now (the message says how
                many it can).
            ScaleInProgressError, UpgradeInProgressError: another scale or an upgrade runs.
            ClusterError: the scale failed, or did not finish within ``timeout_s``.

        Example::

            cluster.scale(6)  # returns once the 6 shards serve
            ticket = cluster.scale(2, wait=False)  # {"scale_id": "scale-...", "from": 6, ...}
        """
        import ray

        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ClusterError(f"shards must be an integer >= 1, got {shards!r}")
        try:
            ticket = self._call("scale", shards)
        except ray.exceptions.RayTaskError as exc:  # the controller's own error, as raised
            raise (exc.cause if exc.cause is not None else exc) from None
        if not wait:
            return ticket
        done = wait_for_scale(self._events_page, ticket, timeout_s)
        return {**self.status(), "scale": done}

    def upgrade(self, model: str) -> dict[str, Any]:
        """Serve another registered version of the deployed model live, with no failed request.

        Shards load only the experts whose checksum they do not hold; requests in flight
        finish on the old version, new ones start on ``model``; the old version's experts go
        once its last request ends, and ``@serving`` moves to ``model``. Rollback is an upgrade
        to the parent version. Returns what the upgrade did (``"upgraded"``: files and bytes
        loaded, weights dropped) with the cluster status after it.

        Raises:
            LookupError: ``model`` names no registered version.
            ConfigError: its dense shape (d_model, vocabulary, layers, heads) differs.
            UpgradeInProgressError: another upgrade is running.

        Example::

            cluster.upgrade("expertmesh-tiny/2")  # e.g. a version grown by add_expert
            cluster.upgrade("expertmesh-tiny/1")  # and back
        """
        import ray

        if not isinstance(model, str) or not model.strip():
            raise ClusterError(f"model must be a registered NAME/VERSION, got {model!r}")
        try:
            return self._call("upgrade", model.strip())
        except ray.exceptions.RayTaskError as exc:  # the controller's own error, as raised
            raise (exc.cause if exc.cause is not None else exc) from None

    def autoscale(
        self,
        *,
        enabled: bool = True,
        min_shards: int = 2,
        max_shards: int = 16,
        target_utilisation: float = 0.7,
        upscale_cooldown_s: float = 30.0,
        downscale_cooldown_s: float = 300.0,
        downscale_delay_s: float = 120.0,
    ) -> None:
        """Let the controller size the shard pool from measured shard load (busy fraction).

        On a real cluster it also asks Ray's autoscaler for the resources, which KubeRay turns
        into pods. ``enabled=False`` turns it off.
        """
        from expertmesh.platform.autoscale import AutoscaleConfig

        cfg = None
        if enabled:
            cfg = AutoscaleConfig(
                min_shards=min_shards,
                max_shards=max_shards,
                target_utilisation=target_utilisation,
                upscale_cooldown_s=upscale_cooldown_s,
                downscale_cooldown_s=downscale_cooldown_s,
                downscale_delay_s=downscale_delay_s,
            )
        self._call("set_autoscaling", cfg)

    # ------------------------------------------------------------------ generation
    def _router(self):
        import ray

        from expertmesh.actors import names

        try:
            return ray.get_actor(names.ROUTER, namespace=names.NAMESPACE)
        except ValueError:
            raise ClusterError("no model is deployed; call cluster.deploy(model) first") from None

    def generate(
        self, prompt: str | list[str], *, routing: bool = False, **sampling: Unpack[SamplingOptions]
    ) -> Completion | list[Completion]:
        """Complete one prompt or a list (all sent at once, batched). One prompt gives a
        Completion, or a list of ``n`` with ``n > 1``; a list of prompts gives a list, ``n``
        per prompt in prompt order. ``sampling``: see :class:`~expertmesh.types.SamplingOptions`.

        Raises:
            ConfigError: a bad or unknown sampling option, named.
            Overloaded: the router's queue is full (``retry_after`` says when to retry).
        """
        import uuid

        import ray

        params = _sampling_params(sampling)
        router = self._router()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        request_id = f"sdk-{uuid.uuid4().hex}"
        refs = [router.generate.remote(p, params, routing, request_id) for p in prompts]
        try:
            # the router answers the n results of each prompt
            outs = [Completion.from_dict(r) for results in ray.get(refs) for r in results]
        except ray.exceptions.RayTaskError as exc:
            router.cancel.remote(request_id)  # the other prompts' sequences
            if isinstance(exc.cause, Overloaded):
                raise exc.cause from None
            raise ClusterError(str(exc.cause if exc.cause else exc)) from None
        except BaseException:  # KeyboardInterrupt: stop generating for it
            router.cancel.remote(request_id)
            raise
        return outs[0] if isinstance(prompt, str) and params["n"] == 1 else outs

    def stream(self, prompt: str, **sampling: Unpack[SamplingOptions]) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (one
        sequence: no ``n``, ``best_of`` or ``logprobs``); closing the generator early (or
        Ctrl-C) stops the generation."""
        import uuid

        import ray

        check_stream_options(sampling)
        sp = _sampling_params(sampling)
        router = self._router()
        request_id = f"sdk-{uuid.uuid4().hex}"
        gen = router.generate_stream.options(num_returns="streaming").remote(
            prompt, sp, 0, request_id
        )
        finished = False
        try:
            for ref in gen:
                try:
                    item = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, Overloaded):
                        raise exc.cause from None
                    raise
                yield item["text"]
            finished = True
        finally:
            if not finished:  # closed early, Ctrl-C or an error: stop generating for it
                router.cancel.remote(request_id)

    # ------------------------------------------------------------------ state
    def status(self) -> dict[str, Any]:
        return self._call("status")

    def events(self, since: float = 0.0, *, after_seq: int = 0) -> list[dict[str, Any]]:
        """The controller's events (persisted, bounded), oldest first: those newer than Unix
        time ``since`` and with a ``seq`` above ``after_seq``."""
        return list(iter_events(lambda after: self._events_page(after, since), after_seq))

    def _events_page(self, after_seq: int, since: float = 0.0) -> dict[str, Any]:
        return self._call("get_events", since, after_seq)

    def runs(self, experiment: str = "expertmesh", max_results: int = 20) -> list[dict[str, Any]]:
        """Recent MLflow runs of ``experiment``."""
        from expertmesh.platform.tracking import Tracker

        return Tracker().recent_runs(experiment, max_results)

    # ------------------------------------------------------------------ jobs and lineage
    def _jobs(self) -> JobClient:
        from expertmesh import published
        from expertmesh.jobs import JobClient

        settings = published.read()
        return JobClient(settings.job_server if settings else None)

    def submit(
        self,
        pipeline: str,
        *,
        working_dir: str | None = None,
        wait: bool = False,
        timeout_s: float = 3600.0,
        env: dict[str, str] | None = None,
        **args: Any,
    ) -> JobInfo:
        """Run ``expertmesh.pipelines.<pipeline>`` as a Ray job on this cluster.

        ``args`` become the pipeline's flags (``steps=50`` -> ``--steps 50``, see
        :func:`expertmesh.jobs.pipeline_args`). The job uses the cluster's MLflow store and
        checkpoint root. ``working_dir`` uploads a local checkout to run instead of the
        cluster's installed code; ``wait`` returns only once the job ended.

        Example::

            job = cluster.submit("finetune", model="expertmesh-tiny", train="router",
                                 domains=["legal"], steps=50, wait=True)
            print(job.status, cluster.lineage("expertmesh-tiny"))
        """
        from expertmesh.jobs import pipeline_args

        client = self._jobs()
        job = client.submit(pipeline, pipeline_args(**args), working_dir=working_dir, env_vars=env)
        return client.wait(job.submission_id, timeout_s=timeout_s) if wait else job

    def jobs(self) -> list[JobInfo]:
        """Every job of this cluster, newest first."""
        return self._jobs().list()

    def job(self, job_id: str) -> JobInfo:
        return self._jobs().info(job_id)

    def job_logs(self, job_id: str) -> str:
        return self._jobs().logs(job_id)

    def stop_job(self, job_id: str) -> bool:
        return self._jobs().stop(job_id)

    def lineage(self, name: str) -> list[VersionNode]:
        """Registered model ``name``'s versions as a tree (roots first), with their lineage."""
        from expertmesh.platform.lineage import lineage_tree
        from expertmesh.platform.tracking import Tracker

        versions = Tracker().versions(name)
        if not versions:
            raise ClusterError(f"no registered model named {name!r}")
        return lineage_tree(versions)

    def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        max_concurrent_per_token: int | None = None,
    ) -> str:
        """Start the HTTP API (Ray Serve) for this cluster; returns its base URL.

        ``max_concurrent_per_token`` bounds the completion requests one API token may have in
        flight (more get 429 with ``Retry-After``); None: no bound."""
        from expertmesh.api import info
        from expertmesh.api.app import start_api

        self._serve_url = start_api(
            host=host, port=port, token=token, max_concurrent_per_token=max_concurrent_per_token
        )
        saved = info.read_info(info.api_file())
        self.api_token = (
            saved.token if saved is not None and saved.url == self._serve_url else token
        )
        return self._serve_url

    def shutdown(self) -> None:
        """Stop the deployment (router, shards, API); stops Ray too if this SDK started it."""
        import ray

        try:
            ray.get(self.controller.shutdown.remote(), timeout=60)
            ray.kill(self.controller, no_restart=True)
        except Exception:
            pass
        if self._serve_url:
            from ray import serve

            serve.shutdown()
        if self.owns_ray:
            ray.shutdown()


def connect(
    address: str | None = None,
    token: str | None = None,
    *,
    local: LocalRayOptions | None = None,
) -> Cluster | HttpCluster:
    """Connect to expertmesh.

    Args:
        address: None starts the embedded default (local Ray on loopback, local MLflow store);
            a Ray address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) joins that cluster;
            ``"http://host:port"`` talks to a running expertmesh HTTP API.
        token: bearer token for the HTTP API (default: ``EXPERTMESH_TOKEN``).
        local: how to start the embedded local cluster (logical CPUs, dashboard on/off).
    """
    if address and address.startswith(("http://", "https://")):
        from expertmesh.client import HttpCluster

        return HttpCluster(address, token=token)
    from expertmesh import published
    from expertmesh.runtime import init_ray

    owns = init_ray(address, local)
    if not owns:  # a cluster we joined: publish our settings unless it has its own
        published.ensure()
    return Cluster(owns_ray=owns)

"""The Ray Serve application builder a KubeRay RayService runs.

``serveConfigV2`` names ``expertmesh.api.serve_app:build_app`` as the application's import path;
Serve calls it on the head with the application's ``args``. It deploys the model (shards,
router, controller) on the running cluster and returns the HTTP API's ingress, so a restarted
head (or a new cluster from an image upgrade) comes back serving the same model with no driver
to keep alive.

Example ``serveConfigV2``::

    applications:
      - name: expertmesh-api
        import_path: expertmesh.api.serve_app:build_app
        route_prefix: /
        args: {model: expertmesh-tiny, version: "3", shards: 4, replicas: 2}

Model upgrades belong to ``Cluster.upgrade`` (live, version by version); a changed ``version``
here makes Serve call the builder again, which redeploys the named version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ray.serve import Application

from expertmesh import envs
from expertmesh.platform.errors import ConfigError
from expertmesh.types import DEFAULT_MAX_QUEUED, ClusterError

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ServeAppArgs:
    """The ``args`` of the RayService application (validated; unknown keys are an error)."""

    model: str  # MLflow registered model name
    version: str | None = None  # registry version; None: the latest one
    shards: int = 4
    replicas: int = 2  # live copies of every expert
    num_cpus: float = 0.25  # per shard
    num_gpus: float = 0.0  # per shard (a fraction: several shards share a GPU)
    # custom Ray resources per shard: the worker groups offer them and the head does not, so
    # shards never land on the head and the autoscaler knows which group to grow
    resources: dict[str, float] = field(default_factory=dict)
    warm_shards: int = 1
    autoscale: bool = False
    max_shards: int = 16  # most shards the autoscaler or a scale request may ask for
    # training and serving start together; serving waits this long for training to register
    model_wait_s: float = 0.0
    max_body_bytes: int = 1024 * 1024
    max_prompts: int = 64
    max_queued: int = DEFAULT_MAX_QUEUED  # sequences waiting for a router slot; beyond: 429
    max_concurrent_per_token: int | None = None  # requests in flight per API token; beyond: 429

    def __post_init__(self) -> None:
        if not self.model or "/" in self.model or ":" in self.model:
            raise ConfigError("model", f"a registered model name, got {self.model!r}")
        for name in ("shards", "replicas", "max_shards"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_shards < self.shards:
            raise ConfigError("max_shards", f"must be >= shards ({self.shards})")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.model_wait_s < 0:
            raise ConfigError("num_cpus/num_gpus/model_wait_s", "must be >= 0")
        if self.max_queued < 0:
            raise ConfigError("max_queued", f"must be >= 0, got {self.max_queued}")
        limit = self.max_concurrent_per_token
        if limit is not None and limit < 1:
            raise ConfigError("max_concurrent_per_token", f"must be >= 1 or null, got {limit}")
        if self.version is not None:
            self.version = str(self.version)

    @property
    def ref(self) -> str:
        """The registry reference :func:`expertmesh.connect().deploy` takes."""
        return self.model if self.version is None else f"{self.model}/{self.version}"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeAppArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(
                ",".join(unknown), f"unknown application args (known: {', '.join(sorted(known))})"
            )
        if "model" not in args:
            raise ConfigError("model", "the application args must name the registered model")
        return cls(**args)


def wait_for_model(ref: str, timeout_s: float, poll_s: float = 10.0) -> None:
    """Return once MLflow resolves ``ref``; raise a clear error after ``timeout_s``."""
    from expertmesh.platform.tracking import Tracker

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            Tracker().resolve_model(ref)
            return
        except LookupError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    "model",
                    f"{exc} after waiting {timeout_s:.0f}s; has the training job registered it?",
                ) from None
            log.info("waiting for %s to be registered: %s", ref, exc)
        time.sleep(poll_s)


def build_app(args: dict[str, Any]) -> Application:
    """Deploy the model named in ``args`` and return the API ingress application.

    Needs ``EXPERTMESH_TOKEN`` (from a Secret): a token generated here would live only in
    the head's memory, and no client could learn it.
    """
    import expertmesh
    from expertmesh.api.app import ApiIngress
    from expertmesh.api.deps import ApiSettings, token_digest

    opts = ServeAppArgs.from_args(dict(args))
    token = envs.api_token()
    if token is None:
        raise ConfigError(
            "EXPERTMESH_TOKEN", "set it on the head (from a Secret) so that clients can know it"
        )
    if opts.model_wait_s:
        wait_for_model(opts.ref, opts.model_wait_s)
    cluster = expertmesh.connect()  # Serve runs this inside the cluster: joins it
    from expertmesh.platform.loader import resolve_model

    wanted = resolve_model(opts.ref).checkpoint_uri
    if cluster.status().get("checkpoint_uri") != wanted:  # a rebuild with other args only
        cluster.deploy(
            opts.ref,
            shards=opts.shards,
            replicas=opts.replicas,
            num_cpus=opts.num_cpus,
            num_gpus=opts.num_gpus,
            resources=opts.resources or None,
            warm_shards=opts.warm_shards,
            max_shards=opts.max_shards,  # bounds scale requests too, not only the autoscaler
            max_queued=opts.max_queued,
        )
    else:  # the same model: only the queue bound may have changed
        try:
            cluster.set_max_queued(opts.max_queued)
        except ClusterError as exc:  # no router: nothing to bound
            log.warning("max_queued not applied: %s", exc)
    cluster.autoscale(
        enabled=opts.autoscale,
        min_shards=min(opts.replicas, opts.shards),
        max_shards=opts.max_shards,
    )
    settings = ApiSettings(
        token_sha256=token_digest(token),
        max_body_bytes=opts.max_body_bytes,
        max_prompts=opts.max_prompts,
        max_concurrent_per_token=opts.max_concurrent_per_token,
    )
    return ApiIngress.bind(settings)

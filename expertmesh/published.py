"""The settings a Ray cluster publishes for every pipeline that runs on it.

``expertmesh up`` and ``expertmesh.connect()`` write one small JSON record (tracking URI,
checkpoint root, whether local paths are shared, the Python that started the cluster) into
Ray's internal key-value store, which lives in the cluster's GCS. A job's driver reads it after
joining the cluster (Ray sets ``RAY_ADDRESS`` for it), so ``Cluster.submit``, ``expertmesh
submit`` and a plain ``ray job submit`` all land in the same store.

NOTE: the internal KV rather than a named actor: it costs no process, survives no worse (both
live as long as the GCS) and is readable before any expertmesh actor exists.
"""

from __future__ import annotations

import sys

from expertmesh import cluster_kv, envs
from expertmesh.platform import storage
from expertmesh.platform.storage import ClusterSettings

KV_NAMESPACE = cluster_kv.NAMESPACE
KV_KEY = cluster_kv.SETTINGS_KEY


def hosts() -> int:
    """Machines the cluster's live nodes run on (nodes on one machine share its disk, as
    ``ray.cluster_utils.Cluster``'s do)."""
    import ray

    cluster_kv.join()
    return len({n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")})


def read() -> ClusterSettings | None:
    """The settings the cluster publishes (joining it first if needed); None if it has none."""
    raw = cluster_kv.get(KV_KEY)
    return None if raw is None else ClusterSettings.from_json(raw)


def publish(settings: ClusterSettings) -> ClusterSettings:
    """Publish ``settings`` for this cluster (replacing earlier ones).

    Raises:
        ConfigError: a node-local path on a cluster spanning machines, not marked shared.
    """
    storage.check_shared(settings, nodes=hosts())
    cluster_kv.put(KV_KEY, settings.to_json())
    return settings


def ensure(
    *,
    tracking_uri: str | None = None,
    checkpoint_root: str | None = None,
    shared_storage: bool | None = None,
    job_server: str | None = None,
) -> ClusterSettings:
    """The cluster's settings; publishes them first when it has none, or when explicit values
    (arguments or the environment) are given. Unset parts come from the environment, else the
    embedded default under ``EXPERTMESH_HOME``."""
    current = read()
    explicit = (
        tracking_uri
        or checkpoint_root
        or envs.mlflow_tracking_uri()
        or envs.checkpoint_root()
        or shared_storage is not None
        or job_server
    )
    if current is not None and not explicit:
        return current
    base = current or storage.default_settings()
    return publish(
        ClusterSettings(
            tracking_uri=storage.tracking_uri(tracking_uri, published=base),
            checkpoint_root=storage.checkpoint_root(checkpoint_root, published=base),
            shared_storage=envs.shared_storage() if shared_storage is None else shared_storage,
            python=sys.executable if current is None else current.python,
            job_server=job_server or base.job_server,
        )
    )


__all__ = ["KV_KEY", "KV_NAMESPACE", "ensure", "hosts", "publish", "read"]

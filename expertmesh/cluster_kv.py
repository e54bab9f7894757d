"""Ray's internal key-value store of the cluster this process runs on (joined if needed).

It holds what a cluster publishes for the processes that run on it (:mod:`expertmesh.published`
writes it, :mod:`expertmesh.platform.storage` reads it). It lives apart from both, and joins
the cluster itself rather than through :mod:`expertmesh.runtime` (which publishes when it starts
a cluster), so that none of them imports another back.
"""

from __future__ import annotations

from expertmesh import envs

NAMESPACE = "expertmesh"
SETTINGS_KEY = "cluster-settings"  # a ClusterSettings record as JSON


def join() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (else the local one) unless Ray is up here."""
    import ray

    if not ray.is_initialized():
        ray.init(address=envs.ray_address() or "auto", namespace="expertmesh", log_to_driver=False)


def get(key: str) -> bytes | None:
    from ray.experimental import internal_kv

    join()
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE)


def put(key: str, value: str) -> None:
    from ray.experimental import internal_kv

    join()
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)

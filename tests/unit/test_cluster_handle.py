"""The Ray-side and the HTTP-side cluster handles offer one surface (no Ray needed)."""

from __future__ import annotations

import inspect

import pytest

import expertmesh
from expertmesh.client import HttpCluster
from expertmesh.sdk import Cluster
from expertmesh.types import ClusterError, ClusterHandle, Completion

SURFACE = ("generate", "stream", "status", "events", "scale")


def _params(func: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(func)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_names_the_shared_surface() -> None:
    members = {
        name
        for name, value in vars(ClusterHandle).items()
        if callable(value) and not name.startswith("_")
    }
    assert members == set(SURFACE)


@pytest.mark.parametrize("impl", [Cluster, HttpCluster])
@pytest.mark.parametrize("method", SURFACE)
def test_both_handles_take_the_same_arguments(impl: type, method: str) -> None:
    """A caller written against ClusterHandle works unchanged with either handle."""
    assert _params(getattr(impl, method)) == _params(getattr(ClusterHandle, method))


def test_an_http_handle_is_a_cluster_handle() -> None:
    with HttpCluster("http://127.0.0.1:9", token="t") as cluster:  # nothing is contacted
        assert isinstance(cluster, ClusterHandle)
        with pytest.raises(ClusterError, match="cannot reach"):
            cluster.status()


def test_shared_types_are_one_object_everywhere() -> None:
    assert expertmesh.ClusterError is ClusterError
    assert expertmesh.Completion is Completion
    assert expertmesh.ClusterHandle is ClusterHandle
    done = Completion.from_dict({"text": "hi", "token_ids": [1, 2]})
    assert done.token_ids == [1, 2] and done.finish_reason is None and done.prompt_tokens == 0

"""The SDK surface shared by the Ray-side and HTTP-side handles, and its tuning (no Ray)."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict

import pytest

import expertmesh
from expertmesh.client import HttpCluster
from expertmesh.sdk import Cluster
from expertmesh.types import ClusterError, ClusterHandle, Completion, RouterTuning

SURFACE = ("generate", "stream", "status", "events", "scale", "upgrade")


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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threads", 0),
        ("threads", -1),
        ("micro_batches", 1.5),
        ("micro_batches", True),
        ("transport", "tcp"),
    ],
)
def test_router_tuning_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: must be .*{value!r}"):
        RouterTuning(**{field: value})  # type: ignore[arg-type]


def test_router_tuning_travels_in_the_controller_record() -> None:
    """The spec the controller writes down comes back with the same tuning after a restart."""
    from expertmesh.actors.state import DeploymentSpec

    spec = DeploymentSpec(
        model="m", checkpoint_uri="/x", router=RouterTuning(micro_batches=2, transport="ray")
    )
    again = DeploymentSpec.from_dict(json.loads(json.dumps(asdict(spec))))
    assert again == spec and again.router.transport == "ray"

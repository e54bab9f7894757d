"""The RayService application's args: typed, checked, and clear about what is wrong."""

from __future__ import annotations

import pytest

from expertmesh.api.serve_app import ServeAppArgs
from expertmesh.platform.errors import ConfigError


def test_args_as_a_serve_config_gives_them() -> None:
    args = ServeAppArgs.from_args(
        {"model": "expertmesh-tiny", "version": 3, "shards": 8, "resources": {"expert_shard": 1}}
    )
    assert args.ref == "expertmesh-tiny/3"  # YAML's 3 is an int; the registry's is a string
    assert ServeAppArgs.from_args({"model": "m"}).ref == "m"  # no version: the latest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "must name the registered model"),
        ({"model": "m", "shard": 2}, "unknown application args"),
        ({"model": "models:/m/1"}, "a registered model name"),
        ({"model": "m", "shards": 0}, "must be >= 1"),
        ({"model": "m", "shards": 8, "max_shards": 4}, "must be >= shards"),
        ({"model": "m", "num_gpus": -0.5}, "must be >= 0"),
        ({"model": "m", "max_queued": -1}, "max_queued: must be >= 0"),
        ({"model": "m", "max_concurrent_per_token": 0}, "max_concurrent_per_token: must be >= 1"),
    ],
)
def test_bad_args_fail_naming_the_field(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeAppArgs.from_args(args)

"""The train pipeline's flags and Ray Train options (no Ray needed)."""

from __future__ import annotations

import pytest

from expertmesh.pipelines.train import build_parser, ray_options
from expertmesh.pipelines.train_ray import RayTrainOptions
from expertmesh.platform.errors import ConfigError


def parse(*argv: str) -> RayTrainOptions | None:
    return ray_options(build_parser().parse_args(list(argv)))


def test_without_workers_the_pipeline_trains_in_process() -> None:
    assert parse("--config", "configs/tiny.yaml") is None


def test_flags_become_ray_train_options() -> None:
    opts = parse("--workers", "2", "--cpus-per-worker", "0.5", "--max-failures", "3")
    assert opts == RayTrainOptions(workers=2, cpus_per_worker=0.5, max_failures=3)
    assert parse("--workers", "1", "--gpus-per-worker", "1").gpus_per_worker == 1.0


def test_ray_flags_without_workers_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="gpus_per_worker: applies to Ray Train only"):
        parse("--gpus-per-worker", "1")
    with pytest.raises(ConfigError) as exc:
        parse("--max-failures", "5")
    assert exc.value.field == "max_failures"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workers", 0),
        ("workers", 1.5),
        ("cpus_per_worker", 0),
        ("gpus_per_worker", -1),
        ("max_failures", -2),
    ],
)
def test_bad_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        RayTrainOptions(**{field: value})
    assert exc.value.field == field

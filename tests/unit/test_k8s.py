"""The KubeRay manifests parse, and every entrypoint they run is a real pipeline module."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"


def _docs() -> list[dict]:
    return [d for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_kustomizations_list_existing_files() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kfile.read_text())["resources"]:
            assert (kfile.parent / res).exists(), (kfile, res)


def test_rayjob_entrypoints_are_pipelines_with_valid_flags() -> None:
    jobs = [d for d in _docs() if d.get("kind") == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} >= {"expertmesh-train", "expertmesh-serve"}
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"]
        module = importlib.import_module(argv[2])
        module.build_parser().parse_args(argv[3:])  # raises SystemExit on an unknown flag

"""The KubeRay deployment: every overlay renders, validates and hangs together.

Rendering is `kubectl kustomize` (its built-in kustomize); KubeRay objects are checked against
the CRD schemas vendored from a pinned release (tests/data/kuberay-crds), everything else, and
every pod template inside the KubeRay objects, with `kubernetes-validate`. The rest checks what
no schema can: names, selectors, Secret keys, ports, entrypoints and capacity agree.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from expertmesh.api.serve_app import ServeAppArgs
from expertmesh.platform.config import find_config, load_config
from expertmesh.platform.federated.config import load_federation
from expertmesh.platform.storage import local_path_of

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
KUBERAY_RELEASE = "v1.7.0"  # the release the vendored schemas come from (see their README)
KUBERNETES_VERSION = "1.32"  # the oldest Kubernetes the manifests are checked against
TARGETS = ["base", "overlays/cpu-demo", "overlays/gpu"]
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
KUBECTL = shutil.which("kubectl")
PIPELINE_JOBS = {  # RayJob -> the pipeline module it runs
    "expertmesh-train": "expertmesh.pipelines.train",
    "expertmesh-finetune": "expertmesh.pipelines.finetune",
    "expertmesh-add-expert": "expertmesh.pipelines.add_expert",
    "expertmesh-federated": "expertmesh.pipelines.federated",
}

pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: overlays cannot be rendered (kubectl kustomize)",
)


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))


@functools.cache
def render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / target)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {target}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def secret_templates() -> dict[str, dict[str, str]]:
    docs = yaml.safe_load_all((K8S / "secrets" / "secrets.template.yaml").read_text())
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d}


def ray_cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    found = {
        "RayCluster": spec,
        "RayService": spec.get("rayClusterConfig"),
        "RayJob": spec.get("rayClusterSpec"),
    }.get(obj["kind"])
    return [found] if found else []


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod an object makes."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in ("Deployment", "StatefulSet"):
        yield name, obj["spec"]["template"]
    for rc in ray_cluster_specs(obj):
        yield f"{name} head", rc["headGroupSpec"]["template"]
        for group in rc.get("workerGroupSpecs", []):
            yield f"{name} {group['groupName']}", group["template"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, tpl in pod_templates(obj):
        for c in tpl["spec"].get("containers", []):
            yield where, c


def strict(schema: Any) -> Any:
    """The API server drops fields a CRD does not know; here they are errors (typos)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    data = json.loads((CRDS / f"{kind}.json").read_text())
    return jsonschema.Draft7Validator(strict(data["schema"]))


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_schema_valid(target: str) -> None:
    for obj in render(target):
        name = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in KUBERAY_KINDS:
            assert obj["apiVersion"] == "ray.io/v1", name
            errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=str)
            assert not errors, f"{name} ({KUBERAY_RELEASE} schema): " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
            )
            for where, tpl in pod_templates(obj):
                # the pod templates, with Kubernetes' own schema too
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                try:
                    kubernetes_validate.validate(
                        pod | {"template": tpl}, KUBERNETES_VERSION, strict=True
                    )
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{target}: {where}: {exc.message}") from None
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_secret_templates_validate_and_hold_no_values() -> None:
    for doc in yaml.safe_load_all((K8S / "secrets" / "secrets.template.yaml").read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    for name, data in secret_templates().items():
        secret_values = {k: v for k, v in data.items() if k not in ("POSTGRES_USER", "POSTGRES_DB")}
        assert all("REPLACE_ME" in v for v in secret_values.values()), name
    for target in TARGETS:  # applying an overlay never overwrites the real Secrets
        assert not [o for o in render(target) if o["kind"] == "Secret"], target


@pytest.mark.parametrize("target", TARGETS)
def test_secret_references_name_template_keys(target: str) -> None:
    secrets = secret_templates()
    for obj in render(target):
        for rc in ray_cluster_specs(obj):
            auth = rc.get("authOptions") or {}
            assert auth.get("mode") == "token", f"{obj['metadata']['name']}: Ray token auth"
            assert "auth_token" in secrets[auth["secretName"]]  # the key KubeRay reads
        for where, c in containers(obj):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (where, env["name"])
                assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") == "disabled")
            for src in c.get("envFrom", []):
                assert src["secretRef"]["name"] in secrets, where


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_ports_agree(target: str) -> None:
    objs = render(target)
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    templates = [tpl for o in objs for _, tpl in pod_templates(o)]

    def matching(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            t
            for t in templates
            if selector.items() <= (t.get("metadata", {}).get("labels") or {}).items()
        ]

    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "expertmesh"
        if obj["kind"] == "Service":
            pods = matching(obj["spec"]["selector"])
            assert pods, f"Service {obj['metadata']['name']} selects no pod"
            names = {p["name"] for t in pods for c in t["spec"]["containers"] for p in c["ports"]}
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in names, (obj["metadata"]["name"], port)
        if obj["kind"] in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
            assert matching(obj["spec"]["selector"]["matchLabels"]), obj["metadata"]["name"]
        if obj["kind"] == "NetworkPolicy":
            sel = obj["spec"]["podSelector"]["matchLabels"]
            # KubeRay labels every Ray pod `ray.io/is-ray-node: "yes"` itself
            assert sel == {"ray.io/is-ray-node": "yes"} or matching(sel), obj["metadata"]["name"]
    for obj in objs:
        for rc in ray_cluster_specs(obj):
            ports = {p["name"]: p["containerPort"] for p in _head(rc)["ports"]}
            assert {"gcs-server", "dashboard", "client"} <= ports.keys()
            if obj["kind"] == "RayService":
                assert ports["serve"] == 8000 and ports["metrics"] == 8080
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    assert _head(rc)[probe]["httpGet"] == {"path": "/api/health", "port": "serve"}


def _head(rc: dict[str, Any]) -> dict[str, Any]:
    return rc["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("target", TARGETS)
def test_tracking_uri_reaches_the_mlflow_server(target: str) -> None:
    objs = render(target)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    (mlflow,) = [
        o for o in objs if o["metadata"]["name"] == "expertmesh-mlflow" and "template" in o["spec"]
    ]
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a[2:], "") for a in args)
    allowed = flags["allowed-hosts"].split(",")
    db = re.fullmatch(
        r"postgresql\+psycopg2://\$\(POSTGRES_USER\):\$\(POSTGRES_PASSWORD\)@([\w-]+):(\d+)/\$\(POSTGRES_DB\)",
        flags["backend-store-uri"],
    )
    assert db, flags["backend-store-uri"]
    assert services[db[1]]["spec"]["ports"][0]["port"] == int(db[2])
    assert flags["artifacts-destination"].startswith("s3://") and "serve-artifacts" in flags
    for probe in ("readinessProbe", "livenessProbe"):
        (host,) = mlflow["spec"]["template"]["spec"]["containers"][0][probe]["httpGet"][
            "httpHeaders"
        ]
        assert host["value"] in allowed
    uris = {
        env["value"]
        for o in objs
        for _, c in containers(o)
        for env in c.get("env", [])
        if env["name"] == "MLFLOW_TRACKING_URI"
    }
    assert uris, "no pod is given the tracking server"
    for uri in uris:
        m = re.fullmatch(r"http://([\w-]+):(\d+)", uri)
        assert m and m[1] in services, uri
        assert int(m[2]) in {p["port"] for p in services[m[1]]["spec"]["ports"]}
        assert f"{m[1]}:{m[2]}" in allowed, f"mlflow --allowed-hosts lacks {m[1]}:{m[2]}"
    for o in objs:  # every Ray pod is told where to track and to keep checkpoints
        for where, c in containers(o):
            if o["kind"] in KUBERAY_KINDS:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert "MLFLOW_TRACKING_URI" in env, where
                assert env.get("EXPERTMESH_CHECKPOINT_ROOT", "").startswith("s3://"), where
                # pyarrow reads the store's AWS_* credentials from the environment
                assert {"secretRef": {"name": "expertmesh-object-store"}} in c["envFrom"], where


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoints_and_serve_import_paths_resolve(target: str) -> None:
    objs = render(target)
    jobs = [o for o in objs if o["kind"] == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == set(PIPELINE_JOBS)
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"]
        assert argv[2] == PIPELINE_JOBS[job["metadata"]["name"]]
        module = importlib.import_module(argv[2])
        args = module.build_parser().parse_args(argv[3:])  # SystemExit on an unknown flag
        if getattr(args, "config", None):
            find_config(args.config)  # the shipped config, from any working folder
        if getattr(args, "clients", None):
            load_federation(args.clients)  # the shipped clients file, likewise
    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert config["http_options"]["port"] == 8000
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
        ServeAppArgs.from_args(app["args"])  # raises on a bad or unknown arg


@pytest.mark.parametrize("target", TARGETS)
def test_pipelines_start_from_what_training_registers_and_serving_serves(target: str) -> None:
    """Training runs on apply; the pipelines that need its model wait (suspended) until a
    user starts them, and name the model training registers and the RayService serves."""
    objs = render(target)
    (train,) = [o for o in objs if o["metadata"]["name"] == "expertmesh-train"]
    argv = shlex.split(train["spec"]["entrypoint"])
    args = importlib.import_module(argv[2]).build_parser().parse_args(argv[3:])
    cfg = load_config(args.config, args.set)
    assert not train["spec"].get("suspend", False)
    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert ServeAppArgs.from_args(app["args"]).model == cfg.train.registered_model
    for job in objs:
        if job["kind"] != "RayJob" or job is train:
            continue
        assert job["spec"]["suspend"] is True, job["metadata"]["name"]
        argv = shlex.split(job["spec"]["entrypoint"])
        model = importlib.import_module(argv[2]).build_parser().parse_args(argv[3:]).model
        assert model == cfg.train.registered_model, job["metadata"]["name"]
        # the data come from the parent's data_uri, which must outlive the training pod
        assert "--data" not in argv
    root = _head(train["spec"]["rayClusterSpec"])["env"]
    root = {e["name"]: e.get("value") for e in root}["EXPERTMESH_CHECKPOINT_ROOT"]
    assert local_path_of(root) is None  # so training publishes its data beside it


def _shards_per_worker(group: dict[str, Any], shard: ServeAppArgs) -> int:
    params = group["rayStartParams"]
    offered = {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}
    offered |= json.loads(json.loads(params.get("resources", '"{}"')))
    wanted = {"CPU": shard.num_cpus, "GPU": shard.num_gpus, **shard.resources}
    return min(math.floor(offered.get(k, 0) / v) for k, v in wanted.items() if v > 0)


@pytest.mark.parametrize("target", TARGETS)
def test_worker_group_fits_the_shard_pool(target: str) -> None:
    (svc,) = [o for o in render(target) if o["kind"] == "RayService"]
    rc = svc["spec"]["rayClusterConfig"]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    shard = ServeAppArgs.from_args(app["args"])
    # the head offers none of the shards' custom resources: no shard lands there
    head_params = rc["headGroupSpec"]["rayStartParams"]
    assert shard.resources and "resources" not in head_params
    assert head_params.get("num-gpus") == "0"
    (group,) = rc["workerGroupSpecs"]
    per_worker = _shards_per_worker(group, shard)
    assert per_worker >= 1
    most = math.ceil((shard.max_shards + shard.warm_shards) / per_worker)
    assert group["maxReplicas"] == most, f"{target}: maxReplicas should be {most}"
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert rc["enableInTreeAutoscaling"] and rc["autoscalerOptions"]["version"] == "v2"
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert float(group["rayStartParams"].get("num-gpus", 0)) == float(gpus or 0)


def test_gpu_overlay_trains_and_serves_on_gpu_workers() -> None:
    objs = render("overlays/gpu")
    for obj in objs:
        for rc in ray_cluster_specs(obj):
            assert rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
            for group in rc.get("workerGroupSpecs", []):
                spec = group["template"]["spec"]
                assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
                assert {
                    "key": "nvidia.com/gpu",
                    "operator": "Exists",
                    "effect": "NoSchedule",
                } in spec["tolerations"]
                assert spec["nodeSelector"]
    jobs = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "RayJob"}
    # the drivers ask for a GPU, so Ray places them on the GPU worker, never on the head
    for name in ("expertmesh-train", "expertmesh-finetune", "expertmesh-add-expert"):
        assert jobs[name]["entrypointNumGpus"] >= 1
        assert jobs[name]["rayClusterSpec"]["workerGroupSpecs"], name
    for name in ("expertmesh-train", "expertmesh-finetune"):
        assert "train.device=cuda" in jobs[name]["entrypoint"]
    argv = shlex.split(jobs["expertmesh-add-expert"]["entrypoint"])
    assert importlib.import_module(argv[2]).build_parser().parse_args(argv[3:]).device == "cuda"
    # the federated clients ask for GPU shares that fit the job's GPU workers together
    argv = shlex.split(jobs["expertmesh-federated"]["entrypoint"])
    args = importlib.import_module(argv[2]).build_parser().parse_args(argv[3:])
    clients = load_federation(args.clients).clients
    (group,) = jobs["expertmesh-federated"]["rayClusterSpec"]["workerGroupSpecs"]
    offered = float(group["rayStartParams"]["num-gpus"]) * group["maxReplicas"]
    assert args.gpus_per_client > 0 and args.gpus_per_client * len(clients) <= offered
    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert ServeAppArgs.from_args(app["args"]).num_gpus > 0


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned_and_match_ray(target: str) -> None:
    pins = _pins()
    flavor = "cuda" if "gpu" in target else "cpu"
    for obj in render(target):
        for rc in ray_cluster_specs(obj):
            assert rc["rayVersion"] == pins["ray"], obj["metadata"]["name"]
        for where, c in containers(obj):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest", (where, c["image"])
            if name.endswith("/expertmesh"):
                assert tag.endswith(f"-ray{pins['ray']}-{flavor}"), (where, c["image"])

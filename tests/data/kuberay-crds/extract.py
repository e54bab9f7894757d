"""Cut a KubeRay CRD down to what the manifest tests need: the served ``v1`` openAPIV3Schema.

Usage: ``python extract.py ray.io_rayclusters.yaml ... > /dev/null`` writes ``<kind>.json`` here.
Descriptions are dropped (most of a CRD's bytes); every type, enum, required list and
``x-kubernetes-*`` marker stays, so validation is the API server's structural check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(paths: list[str]) -> None:
    here = Path(__file__).parent
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        kind = crd["spec"]["names"]["kind"]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip(version["schema"]["openAPIV3Schema"])
        out = {"group": crd["spec"]["group"], "version": "v1", "kind": kind, "schema": schema}
        (here / f"{kind}.json").write_text(json.dumps(out, sort_keys=True, separators=(",", ":")))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The Dockerfile, checked without Docker: what it copies exists and survives .dockerignore,
it installs with the constraints, and its Ray and torch agree with the pins and the manifests."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)  # join continued lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))


def _ignored(path: str) -> bool:
    """Docker's rule: the last matching .dockerignore line decides (``!`` re-includes)."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            ignored = not negate
    return ignored


def test_every_copied_file_exists_and_reaches_the_build() -> None:
    copies = [rest for op, rest in _instructions() if op == "COPY"]
    assert copies
    for rest in copies:
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in args[:-1]:
            assert (REPO / src).exists(), f"COPY {src}: no such file"
            assert not _ignored(src), f"COPY {src}: excluded by .dockerignore"
    # the package's configs travel as package data (not a checkout's configs/ folder)
    assert (
        "configs/*.yaml"
        in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-data"
        ]["expertmesh"]
    )
    assert list((REPO / "expertmesh" / "configs").glob("*.yaml"))


def test_installs_with_the_constraints_and_the_pinned_torch() -> None:
    pins = _pins()
    runs = [rest for op, rest in _instructions() if op == "RUN" and "pip install" in rest]
    assert runs
    for run in runs:
        for cmd in run.split("&&"):
            if "pip install" in cmd:
                assert "-c constraints.txt" in cmd, cmd.strip()
    assert f"torch=={pins['torch']}" in " ".join(runs)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in re.findall(r"'\.\[(\w+)\]'", " ".join(runs)):
        assert extra in extras, f"the Dockerfile installs an unknown extra [{extra}]"
        for req in extras[extra]:
            name = re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0]
            assert name in pins, f"{name} (extra [{extra}]) is not pinned in constraints.txt"


def test_bases_are_ray_images_of_the_pinned_version() -> None:
    pins = _pins()
    args = dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)
    assert args["RAY_VERSION"] == pins["ray"]
    bases = [rest.split()[0] for op, rest in _instructions() if op == "FROM"]
    ray_bases = [b for b in bases if b.startswith("rayproject/ray:")]
    assert {b.rsplit("-", 1)[-1] for b in ray_bases} == {"cpu", "gpu"}
    for base in ray_bases:
        assert base.startswith("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-"), base
    assert bases[-1] == "base-${FLAVOR}" and args["FLAVOR"] == "cpu"


def test_the_wheel_the_image_installs_carries_the_configs(tmp_path: Path) -> None:
    """Build the wheel from what the Dockerfile copies (setuptools' own backend, no network)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "expertmesh", src / "expertmesh", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "ui", src / "ui", ignore=shutil.ignore_patterns("node_modules"))
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / out.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (REPO / "expertmesh" / "configs").glob("*.yaml")}
    assert {f"expertmesh/configs/{n}" for n in shipped} <= set(names)
    assert "expertmesh/api/serve_app.py" in names
    data = [n for n in names if "/data/share/expertmesh/ui/" in n]  # the console's files
    assert {n.rsplit("/ui/", 1)[1] for n in data} >= {"index.html", "app.js"}

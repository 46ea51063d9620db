#!/usr/bin/env bash
# The prepared GPU check: about ten minutes on one GPU (see scripts/gpu_check.py and docs/cluster.md).
#   bash scripts/gpu_check.sh [WORK_DIR]        GPU_CHECK_CPU_ONLY=1 bash scripts/gpu_check.sh: specs only
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"

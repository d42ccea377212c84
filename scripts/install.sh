#!/usr/bin/env bash
# Creates .venv and installs rag_e2e with its test and demo extras.
#   CPU machine (no nvidia-smi): torch 2.13.0, the CPU build on these machines.
#     Elsewhere, for a CPU-only wheel: TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
#   GPU machine: the default (CUDA) torch build; add faiss-gpu with  RAG_E2E_GPU=1 bash scripts/install.sh
# Override the torch requirement with TORCH_SPEC (e.g. TORCH_SPEC='torch==2.5.1').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if command -v nvidia-smi >/dev/null 2>&1; then default_torch="torch>=2.4"; else default_torch="torch==2.13.0"; fi
torch_args=("${TORCH_SPEC:-$default_torch}")
[[ -n ${TORCH_INDEX:-} ]] && torch_args+=(--index-url "$TORCH_INDEX")
# torch first, so the package's own torch range is already met and pip pulls no other build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_ "${torch_args[@]}"
extras="test,demo"
[[ -n ${RAG_E2E_GPU:-} ]] && extras="$extras,gpu"
pip_ -e ".[${extras}]"
if [[ -n ${RAG_E2E_GPU:-} ]]; then "$VENV/bin/python" -m pip uninstall -y -q faiss-cpu || true; fi
echo "installed rag_e2e into $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# Retriever pretraining (InfoNCE with in-batch and mined negatives).
#
#   scripts/train_retriever.sh                        the embedded demo on CPU, offline: writes the
#                                                     demo world to data/demo if missing, then trains
#                                                     configs/retriever_demo.yaml into runs/retriever_demo
#   scripts/train_retriever.sh CONFIG [key=value ...] accelerate launch on one or many GPUs/nodes;
#                                                     pass launcher flags in ACCELERATE_ARGS, e.g.
#                                                     ACCELERATE_ARGS="--multi_gpu --num_processes 8"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [[ $# -eq 0 ]]; then
  export HF_HUB_OFFLINE=1
  [[ -f data/demo/psgs.tsv ]] || "$PYTHON" -m rag_e2e.demo_world data/demo --seed 0
  exec "$PYTHON" -m rag_e2e.train_retriever --config configs/retriever_demo.yaml --overwrite
fi

config=$1
shift
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec "$PYTHON" -m accelerate.commands.launch ${ACCELERATE_ARGS:-} -m rag_e2e.train_retriever --config "$config" "$@"

#!/usr/bin/env bash
# Joint RAG training.
#   scripts/train_rag.sh                         the embedded demo (offline, CPU): runs/demo/metrics.json
#   scripts/train_rag.sh key=value ...           the demo with overrides (train.optim.max_steps=500)
#   scripts/train_rag.sh CONFIG.yaml [args]      a run config under `accelerate launch` (one GPU, many, many nodes);
#                                                accelerate's own flags go in ACCELERATE_ARGS, e.g.
#   ACCELERATE_ARGS="--num_processes 8 --mixed_precision bf16" scripts/train_rag.sh configs/rag_sequence_nq.yaml
#   ACCELERATE_ARGS="--num_machines 4 --machine_rank $RANK --main_process_ip $MASTER --num_processes 32" ...
# Python: .venv/bin/python if scripts/install.sh made one, else python3 (override with PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
if [[ $# -eq 0 || $1 == *=* ]]; then
  exec "$PY" -m rag_e2e.demo "$@"
fi
config=$1; shift
# shellcheck disable=SC2086
exec "$PY" -m accelerate.commands.launch ${ACCELERATE_ARGS:-} -m rag_e2e.train_rag --config "$config" "$@"

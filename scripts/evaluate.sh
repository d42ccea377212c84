#!/usr/bin/env bash
# Decode and score a checkpoint: EM, F1, recall@K, predictions.jsonl with provenance.
#   scripts/evaluate.sh --checkpoint runs/nq/checkpoints/best --data nq-test.qa.csv --out runs/nq/eval-test \
#       decode.mode=rag_sequence_thorough decode.num_beams=4
#   (--index DIR swaps in another index, e.g. a newer Wikipedia dump: the paper's hot-swapped knowledge)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec "$PY" -m rag_e2e.evaluate "$@"

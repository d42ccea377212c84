#!/usr/bin/env bash
# Retriever pretraining (InfoNCE with in-batch and mined negatives).
#
#   scripts/train_retriever.sh                        the demo's retriever stage on CPU, offline: writes the
#                                                     demo world to data/demo if missing, then trains
#                                                     configs/retriever_demo.yaml into runs/retriever_demo
#                                                     (an earlier run there is moved aside, never deleted)
#   scripts/train_retriever.sh CONFIG [args ...]      accelerate launch on one or many GPUs/nodes; flags for
#                                                     the launcher in ACCELERATE_ARGS, e.g.
#                                                     ACCELERATE_ARGS="--multi_gpu --num_processes 8"
#   NPROC=2 scripts/train_retriever.sh CONFIG ...     CPU only: torchrun with NPROC processes (gloo)
# args: dotted overrides (optim.lr=1e-5), --resume (continue from the latest checkpoint), --overwrite.
# Python: .venv/bin/python if scripts/install.sh made one, else python3 (override with PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

if [[ $# -eq 0 ]]; then
  # the world of configs/demo.yaml: 800 entities, 6 passages each
  [[ -f data/demo/psgs.tsv ]] || "$PY" -m rag_e2e.demo_world data/demo --seed 0 --n-entities 800 --n-train 2400 \
    --n-dev 50 --n-test 200 --mentions 0 --chunks 6 --min-words 18 --max-words 25 --value-pool 40
  out=runs/retriever_demo
  if [[ -d $out ]] && [[ -n $(ls -A "$out") ]]; then
    mv "$out" "$out.prev-$(date +%Y%m%d-%H%M%S)"
  fi
  exec "$PY" -m rag_e2e.train_retriever --config configs/retriever_demo.yaml
fi

config=$1
shift
if [[ $("$PY" -c "import torch; print(torch.cuda.device_count())") == 0 && ${NPROC:-1} -gt 1 ]]; then
  # accelerate launch --cpu starts one process; torchrun starts NPROC that form a gloo group
  exec "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" -m rag_e2e.train_retriever --config "$config" "$@"
fi
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec "$PY" -m accelerate.commands.launch ${ACCELERATE_ARGS:-} -m rag_e2e.train_retriever --config "$config" "$@"

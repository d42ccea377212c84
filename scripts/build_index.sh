#!/usr/bin/env bash
# Encode a passages file into fp16 embeddings, then build its FAISS index.
#   scripts/build_index.sh configs/index_nq.yaml [key=value ...]
#   scripts/build_index.sh passages=psgs_w100.tsv out_dir=runs/index retriever.query_model=PATH index.kind=hnsw
#   NPROC=8 scripts/build_index.sh configs/index_nq.yaml     # encode on 8 processes
# GPUs: the encode runs under `accelerate launch` with NPROC processes (default: every GPU;
#   ACCELERATE_CONFIG=file for several nodes). CPU: under torchrun with NPROC (default 1).
# The encode resumes a killed run (finished shards are kept); the build runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
args=()
if [[ $1 == *.yaml || $1 == *.yml ]]; then args=(--config "$1"); shift; fi
args+=("$@")

ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
  "$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" -m index_build.encode "${args[@]}"
elif (( ngpu > 0 )); then
  nproc=${NPROC:-$ngpu}
  multi=(); (( nproc > 1 )) && multi=(--multi_gpu)
  "$PY" -m accelerate.commands.launch "${multi[@]}" --num_processes "$nproc" --num_machines 1 \
    --mixed_precision no --dynamo_backend no -m index_build.encode "${args[@]}"
elif (( ${NPROC:-1} > 1 )); then
  # accelerate launch --cpu starts one process; torchrun starts NPROC that form a gloo group
  "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" -m index_build.encode "${args[@]}"
else
  "$PY" -m index_build.encode "${args[@]}"
fi
"$PY" -m index_build.build "${args[@]}"

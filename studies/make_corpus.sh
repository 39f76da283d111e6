#!/usr/bin/env bash
# Regenerates the corpus of past sweeps (studies/corpus-*.parquet) and the held-out sweeps of the
# pruner benchmark (studies/heldout-*.parquet). Two lanes run side by side, one torch thread each.
# Every command resumes where it stopped if the script is killed and run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
N=${N:-300}        # corpus trials per task
H=${H:-60}         # held-out trials per task
COMMON=(--space studies/corpus.toml --sampler random --epochs 10 --probe-size 8 --quiet)
SHORT=(--task-option seq_len=24 --task-option n_train=500 --task-option n_val=200)

sweep() {  # NAME SEED TASK [OPTIONS...]
  local name=$1 seed=$2; shift 2
  lepredict sweep --study-name "$name" --seed "$seed" --n-trials "$N" "${COMMON[@]}" "$@"
  lepredict export --study-name "$name" -o "studies/$name.parquet"
}

lane1() {
  sweep corpus-digits 1 --task digits --task-option mode=row
  sweep corpus-charlm 2 --task charlm "${SHORT[@]}"
  sweep corpus-copy 3 --task copy --task-option n_train=500 --task-option n_val=200
  N=$H sweep heldout-digits 101 --task digits --task-option mode=row --le-epochs 0 1 2 3 4 5 6 7 8 9 10
  N=$H sweep heldout-lorenz 103 --task lorenz "${SHORT[@]}" --le-epochs 0 1 2 3 4 5 6 7 8 9 10
}

lane2() {
  sweep corpus-adding 4 --task adding "${SHORT[@]}"
  sweep corpus-lorenz 5 --task lorenz "${SHORT[@]}"
  N=$H sweep heldout-adding 102 --task adding "${SHORT[@]}" --le-epochs 0 1 2 3 4 5 6 7 8 9 10
}

lane1 > studies/lane1.log 2>&1 &
lane2 > studies/lane2.log 2>&1 &
wait

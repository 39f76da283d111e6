#!/usr/bin/env bash
# Paired sweeps for studies/probe_size.py: the same configurations, trained the same way (the
# probe does not touch training), with spectra averaged over PROBES validation sequences each.
# Configurations no shipped predictor saw: corpus.toml's space on its four tasks (seeds 301-304,
# 10 epochs, like corpus v1) and corpus-v2.toml's space on four tasks outside corpus v1 (seeds
# 311-314, 4 epochs). One lane per probe size, one torch thread each.
#
#   studies/probe_size.sh                        # N=120 per task: 8 tasks x 2 probes x 120,
#                                                # about 35 minutes on 2 cores (studies/probe/)
#   N=4 OUT=/tmp/probe studies/probe_size.sh     # a tiny trial run
# A study that exists resumes: a larger N adds the trials it lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
N=${N:-120}
PROBES=${PROBES:-"8 4"}
OUT=${OUT:-studies/probe}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT/logs-probe"

V1=(--space studies/corpus.toml --epochs 10)
V2=(--space studies/corpus-v2.toml --epochs 4)
SHORT=(--task-option seq_len=24 --task-option n_train=500 --task-option n_val=200)
SIZE=(--task-option n_train=1000 --task-option n_val=200)
# NAME SEED SPACE... TASK OPTIONS... ; the slowest first.
TASKS=(
  "lorenz 301 ${V1[*]} --task lorenz ${SHORT[*]}"
  "charlm 302 ${V1[*]} --task charlm ${SHORT[*]}"
  "digits 303 ${V1[*]} --task digits --task-option mode=row"
  "adding10 304 ${V1[*]} --task adding --task-option seq_len=10 ${SIZE[*]}"
  "sines 311 ${V2[*]} --task sines --task-option seq_len=32 ${SIZE[*]}"
  "narma 312 ${V2[*]} --task narma --task-option seq_len=32 ${SIZE[*]}"
  "copy 313 ${V2[*]} --task copy --task-option seq_len=10 --task-option copy_len=3 ${SIZE[*]}"
  "parity 314 ${V2[*]} --task parity --task-option seq_len=12 --task-option n_bits=2 ${SIZE[*]}"
)

lane() {  # PROBE
  local probe=$1 line name seed options study
  for line in "${TASKS[@]}"; do
    read -r name seed options <<< "$line"
    study="probe$probe-$name"
    # shellcheck disable=SC2086  # the options are words
    "$PYTHON" -m lepredict sweep --study-name "$study" --storage "sqlite:///$OUT/$study.db" \
      --seed "$seed" --n-trials "$N" --sampler random --le-epochs 0 1 2 3 \
      --probe-size "$probe" --quiet $options >> "$OUT/logs-probe/$study.log" 2>&1
    "$PYTHON" -m lepredict export --study-name "$study" --storage "sqlite:///$OUT/$study.db" \
      -o "$OUT/$study.parquet"
  done
}

pids=()
for probe in $PROBES; do
  lane "$probe" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

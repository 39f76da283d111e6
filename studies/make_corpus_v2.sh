#!/usr/bin/env bash
# Builds corpus v2 (studies/v2-TASK-eE.parquet): 8 tasks x 2 horizons (E training epochs), one
# random-sampled sweep of studies/corpus-v2.toml each, spectra at epochs 0-3 over 8 validation
# sequences. LANES sweeps run side by side, one torch thread each. Every sweep resumes where it
# stopped if the script is killed and run again (wait the 90 s grace period first, so the
# trials the kill interrupted are failed and run again); finished studies are only re-exported.
#
#   studies/make_corpus_v2.sh                       # N=350: 16 studies, 5,600 trials
#   LANES=16 studies/make_corpus_v2.sh              # on a 16-core machine
#   N=4 HORIZONS="4 6" OUT=/tmp/v2 studies/make_corpus_v2.sh   # a tiny trial run
#
# Settings (environment):
#   N         trials per study (per task and horizon); 350 gives 16 x 350 = 5,600 (default 350)
#   HORIZONS  training epochs of the studies, one study per task and value (default "4 6")
#   LANES     sweep processes at once (default 2)
#   WORKERS   processes per study (default 1); more than one share its SQLite file, and
#             together stop at N (use it when LANES exceeds the 16 studies)
#   DEVICE    torch device of the runs (default cpu)
#   POP       --population of each sweep (default 1: trials one at a time; see studies/README.md
#             for why populations stay at one member in this space)
#   OUT       where the SQLite stores, logs and exports go (default studies)
#   PYTHON    the interpreter that runs lepredict (default python); from the repository root,
#             so this checkout's lepredict is the one that runs
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
N=${N:-350}
HORIZONS=${HORIZONS:-"4 6"}
LANES=${LANES:-2}
WORKERS=${WORKERS:-1}
DEVICE=${DEVICE:-cpu}
POP=${POP:-1}
OUT=${OUT:-studies}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT/logs-v2"

COMMON=(--space studies/corpus-v2.toml --sampler random --le-epochs 0 1 2 3 --probe-size 8
        --device "$DEVICE" --population "$POP" --quiet)
SIZE=(--task-option n_train=1000 --task-option n_val=200)

# One line per task: NAME SEED TASK OPTIONS... (the study of horizon E is v2-NAME-eE, its seed
# SEED + E, so no two studies draw the same configurations). Sequence lengths 8 to 32;
# the slowest tasks first, so that the lanes finish together.
TASKS=(
  "charlm 200 charlm --task-option seq_len=24 ${SIZE[*]}"
  "narma 300 narma --task-option seq_len=32 ${SIZE[*]}"
  "sines 400 sines --task-option seq_len=32 ${SIZE[*]}"
  "lorenz 500 lorenz --task-option seq_len=24 ${SIZE[*]}"
  "copy 600 copy --task-option seq_len=10 --task-option copy_len=3 ${SIZE[*]}"
  "parity 700 parity --task-option seq_len=12 --task-option n_bits=2 ${SIZE[*]}"
  "adding 800 adding --task-option seq_len=10 ${SIZE[*]}"
  "digits 900 digits --task-option mode=row"
)

sweep() {  # STUDY SEED EPOCHS TASK [OPTIONS...]
  local study=$1 seed=$2 epochs=$3; shift 3
  "$PYTHON" -m lepredict sweep --study-name "$study" --storage "sqlite:///$OUT/$study.db" \
    --seed "$seed" --n-trials "$N" --epochs "$epochs" "${COMMON[@]}" --task "$@" \
    >> "$OUT/logs-v2/$study.log" 2>&1
}

studies=()
running=0
failed=0
for epochs in $(tr ' ' '\n' <<< "$HORIZONS" | sort -rn); do  # the longer horizon first
  for line in "${TASKS[@]}"; do
    read -r name seed task options <<< "$line"
    study="v2-$name-e$epochs"
    studies+=("$study")
    for _ in $(seq "$WORKERS"); do
      if (( running >= LANES )); then
        wait -n || failed=1
        running=$((running - 1))
      fi
      # shellcheck disable=SC2086  # the options are words
      sweep "$study" $((seed + epochs)) "$epochs" "$task" $options &
      running=$((running + 1))
    done
  done
done
while (( running > 0 )); do
  wait -n || failed=1
  running=$((running - 1))
done

for study in "${studies[@]}"; do
  # Refused while the study has trials marked running: a worker killed less than the grace
  # period ago left them, and the next run of this script fails and reruns them.
  "$PYTHON" -m lepredict export --study-name "$study" --storage "sqlite:///$OUT/$study.db" \
    -o "$OUT/$study.parquet" || failed=1
done
if (( failed )); then
  echo "make_corpus_v2: not finished (see the messages above and $OUT/logs-v2/); run it" \
    "again, 90 s or more after any kill" >&2
  exit 1
fi

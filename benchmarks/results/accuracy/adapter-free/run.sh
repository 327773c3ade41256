#!/usr/bin/env bash
# The adapter-free baselines on every table of RESULTS.md, 3 seeds, under each table's recipe
# (its learning rate, epochs, batch, bf16): frozen (a head trained on the frozen backbone, with
# classifier alignment like every method of the tables), SimpleCIL and RanPAC (closed-form
# heads: no alignment, which would re-train them; on task-incremental split-GLUE one head per
# task). They answer whether adapting the backbone helps at all.
#
#   VIT=dir MINILM=dir DATA=dir OUT=dir PARALLEL=n bash run.sh text|vision
#
# vision includes split-cifar100-20 (folder cifar-20), the fusion ablation's stream.
#
# DEVICE (default cuda), STRATEGIES (default "frozen simplecil ranpac") and TABLES (folder
# names, default all of the phase's) pick the device and a subset of the strategies and tables.
set -euo pipefail
phase=$1
jobs=$(mktemp)
strategies=${STRATEGIES:-frozen simplecil ranpac}
common="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA"
text="$common --backbone $MINILM --batch-size 64 --epochs 2"
vision="$common --backbone-weights $VIT --batch-size 128"

# folder benchmark "flags"
add() {
  local folder=$1 benchmark=$2 flags=$3 seed strategy
  [[ -n ${TABLES:-} && " $TABLES " != *" $folder "* ]] && return
  for seed in 0 1 2; do
    for strategy in $strategies; do
      if [[ $strategy == frozen ]]; then
        echo "$folder $benchmark frozen $seed $flags --set alignment.enabled=true" >> "$jobs"
      else
        echo "$folder $benchmark $strategy $seed $flags --set alignment.enabled=false" >> "$jobs"
      fi
    done
  done
}

if [[ $phase == text ]]; then
  add sentiment-dil sentiment-dil "$text --lr 8e-3"
  add glue-class split-glue "$text --lr 2e-3 --protocol class-incremental"
  add glue-task split-glue "$text --lr 4e-3 --protocol task-incremental"
else
  add cifar-10 split-cifar100-10 "$vision --epochs 2 --lr 1e-3"
  add cifar-20 split-cifar100-20 "$vision --epochs 2 --lr 1e-3"
  add pacs-dil pacs-dil "$vision --epochs 5 --lr 5e-4"
fi
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs-$phase.txt"
python3 -m benchmarks.accuracy.campaign --jobs "$jobs" --parallel "$PARALLEL" --out "$OUT"

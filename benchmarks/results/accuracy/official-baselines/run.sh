#!/usr/bin/env bash
# The official-baselines study: every table cell the baseline fixes touch (SD-LoRA with one
# magnitude per experience for all layers, SD-LoRA-RR's schedule, InfLoRA's designed A and
# DualGPM rule, O-LoRA at the reference code's alpha and dropout; SuLoRA's task-aware inference
# on split-GLUE task-incremental), 3 seeds each, under the protocol of the earlier campaigns:
# each benchmark's validated learning rate and each method's validated scale (O-LoRA: its
# preset, the reference code's 32). Also: SD-LoRA at rank 4 (SuLoRA's live budget per
# experience), and SD-LoRA's magnitude scope (model vs layer) on each validation split (seed 0).
#
#   VIT=dir MINILM=dir DATA=dir OUT=dir PARALLEL=n bash run.sh text|vision
set -euo pipefail
phase=$1
jobs=$(mktemp)
V=benchmarks/accuracy/variants
common="--device cuda --precision bf16 --data-root $DATA --set alignment.enabled=true"
text="$common --backbone $MINILM --batch-size 64 --epochs 2"
vision="$common --backbone-weights $VIT --batch-size 128"

# folder benchmark "flags" SD-LoRA's scale InfLoRA's scale
add() {
  local folder=$1 benchmark=$2 flags=$3 sd=$4 inf=$5 seed strategy
  for seed in 0 1 2; do
    for strategy in sdlora sdlora-rr $V/sdlora-r4.yaml; do
      echo "$folder $benchmark $strategy $seed $flags --set method.alpha=$sd" >> "$jobs"
    done
    echo "$folder $benchmark inflora $seed $flags --set method.alpha=$inf" >> "$jobs"
    echo "$folder $benchmark olora $seed $flags" >> "$jobs"
  done
  for strategy in sdlora $V/sdlora-layer.yaml; do
    echo "$folder/validation $benchmark $strategy 0 $flags --validation 0.1" \
      "--set method.alpha=$sd" >> "$jobs"
  done
}

if [[ $phase == text ]]; then
  add sentiment-dil sentiment-dil "$text --lr 8e-3" 4 8
  add glue-class split-glue "$text --lr 2e-3 --protocol class-incremental" 4 8
  add glue-task split-glue "$text --lr 4e-3 --protocol task-incremental" 1 10
  for seed in 0 1 2; do
    echo "glue-task split-glue sulora $seed $text --lr 4e-3 --protocol task-incremental" \
      "--set method.alpha=2.0 method.allocator=data method.data_energy=0.9" >> "$jobs"
  done
else
  add cifar-10 split-cifar100-10 "$vision --epochs 2 --lr 1e-3" 1 10
  add pacs-dil pacs-dil "$vision --epochs 5 --lr 5e-4" 4 4
fi
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs-$phase.txt"
python3 -m benchmarks.accuracy.campaign --jobs "$jobs" --parallel "$PARALLEL" --out "$OUT"

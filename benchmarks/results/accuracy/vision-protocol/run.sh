#!/usr/bin/env bash
# A search, on validation, for a vision protocol where adapting the backbone beats the
# adapter-free baseline (issue: split-cifar100-10 under the recorded protocol, 2 epochs at
# lr 1e-3, has every adapter method within noise of `frozen`). split-cifar100-10 with 10% of
# each class's training images held out (--validation 0.1), seed 0, ViT-S/4, batch 128, bf16,
# classifier alignment on: `frozen`, SuLoRA, SD-LoRA at 5 epochs per experience and lr 1e-3 or
# 3e-3, JointLoRA (upper bound) at 5 epochs and lr 1e-3, and `frozen` at the recorded 2 epochs
# and lr 1e-3. Each setting writes into its own folder (e<epochs>-lr<lr>/).
#
#   VIT=dir DATA=dir OUT=dir PARALLEL=n bash run.sh
set -euo pipefail
jobs=$(mktemp)
flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone-weights $VIT"
flags="$flags --batch-size 128 --validation 0.1 --set alignment.enabled=true"
for lr in 1e-3 3e-3; do
  for strategy in frozen sulora sdlora; do
    echo "e5-lr$lr split-cifar100-10 $strategy 0 $flags --epochs 5 --lr $lr" >> "$jobs"
  done
done
echo "e5-lr1e-3 split-cifar100-10 jointlora 0 $flags --epochs 5 --lr 1e-3" >> "$jobs"
echo "e2-lr1e-3 split-cifar100-10 frozen 0 $flags --epochs 2 --lr 1e-3" >> "$jobs"
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs.txt"
python3 -m benchmarks.accuracy.campaign --jobs "$jobs" --parallel "$PARALLEL" --out "$OUT"

#!/usr/bin/env bash
# split-CIFAR-100 in 50 experiences of 2 classes (ViT-S/4, class-incremental): every method side
# by side over three class orders (class-order seeds 0, 1, 2), at the 10-experience table's
# settings (recipe cifar100-10: lr 1e-3, 2 epochs, batch 128, bf16, classifier alignment on, off
# for SimpleCIL and RanPAC, whose heads are closed-form). SuLoRA at 5, 10 (the preset) and 20
# slots, so that fusion fires 45, 40 and 30 times, and without fusion at one slot per
# experience (`sulora-nofusion`, 50 slots).
#
#   VIT=dir DATA=dir OUT=dir PARALLEL=n [SEEDS="0 1 2"] [STRATEGIES="..."] [DEVICE=cpu] \
#     [EXTRA="..."] [RECORDED=dir] [CHECKPOINTS=dir] \
#     bash benchmarks/results/accuracy/cifar100-50/run.sh
#   (from the repository root)
#
# SEEDS: the run seeds of every order (default: seed k with order k only; "0 1 2" makes the
# full 3 seeds x 3 orders, seed by seed: a campaign cut short leaves whole seeds).
# STRATEGIES: these only (frozen sulora sulora-s5 sulora-s20 sulora-nofusion sdlora sdlora-rr
# inflora olora inclora seqlora jointlora simplecil ranpac). EXTRA: more arguments for every run
# (e.g. "--num-experiences 3 --limit-per-class 4" for a smoke test).
# Started again with the same OUT, the campaign skips the runs it finished (their .done files);
# RECORDED=dir copies the records of runs made before (dir/order<k>/*.json, e.g. this folder)
# into OUT and skips those runs too. CHECKPOINTS=dir: every run checkpoints after each experience
# into dir (removed once its record is written), so a campaign cut short and started again resumes
# its unfinished runs from their last finished experience instead of from the start.
set -euo pipefail
jobs=$(mktemp)
V=benchmarks/accuracy/variants
flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone-weights $VIT"
flags="$flags --epochs 2 --batch-size 128 --lr 1e-3 --set alignment.enabled=true"
flags="$flags training.eval_batch_size=2048${EXTRA:+ $EXTRA}"

source benchmarks/accuracy/study.sh
add frozen frozen
add sulora sulora
add sulora-s5 $V/sulora-s5.yaml
add sulora-s20 $V/sulora-s20.yaml
add sulora-nofusion sulora-nofusion --set method.num_slots=50
for strategy in sdlora sdlora-rr inflora olora inclora seqlora jointlora; do
  add $strategy $strategy
done
for strategy in simplecil ranpac; do
  add $strategy $strategy --set alignment.enabled=false
done
write_jobs "$jobs" "" split-cifar100-50 --class-order-seed "$flags"
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs.txt"
copy_recorded split-cifar100-50 ""
run_campaign "$jobs"

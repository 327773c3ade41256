#!/usr/bin/env bash
# split-CIFAR-100 in 50 experiences of 2 classes (ViT-S/4, class-incremental): every method side
# by side over three class orders (class-order seeds 0, 1, 2), at the 10-experience table's
# settings (benchmarks/accuracy/cifar_study.sh says which). SuLoRA at 5, 10 (the preset) and 20
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
# RETRIES=n: the runs that fail are started again once the others have ended, with half as many
# side by side, up to n times (default 1; 0: never).
set -euo pipefail
source benchmarks/accuracy/cifar_study.sh
cifar_study split-cifar100-50 50 sulora-s5 sulora-s20

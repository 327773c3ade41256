#!/usr/bin/env bash
# split-CIFAR-100 in 20 experiences of 5 classes (ViT-S/4, class-incremental): every method side
# by side over three class orders (class-order seeds 0, 1, 2), at the 10-experience table's
# settings (benchmarks/accuracy/cifar_study.sh says which), as ../cifar100-50/ has them for 50
# experiences. SuLoRA at 5 and 10 (the preset) slots, so that fusion fires 15 and 10 times, and
# without fusion at one slot per experience (`sulora-nofusion`, 20 slots). RESULTS.md's fusion
# table (`aligned2/`, `adapter-free/cifar-20/`) has the benchmark's default class order only.
#
#   VIT=dir DATA=dir OUT=dir PARALLEL=n [SEEDS="0 1 2"] [STRATEGIES="..."] [DEVICE=cpu] \
#     [EXTRA="..."] [RECORDED=dir] [CHECKPOINTS=dir] \
#     bash benchmarks/results/accuracy/cifar100-20/run.sh
#   (from the repository root)
#
# STRATEGIES: these only (frozen sulora sulora-s5 sulora-nofusion sdlora sdlora-rr inflora olora
# inclora seqlora jointlora simplecil ranpac). The other options: as in ../cifar100-50/run.sh.
set -euo pipefail
source benchmarks/accuracy/cifar_study.sh
cifar_study split-cifar100-20 20 sulora-s5

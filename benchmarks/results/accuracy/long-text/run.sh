#!/usr/bin/env bash
# The long-text study: O-LoRA's long sequence (14 tasks with data, 50 classes) on MiniLM-L6,
# every method side by side, three stream orders (seeded permutations 0, 1, 2; run seed k
# with order k). Settings: split-GLUE's validated ones for the protocol (learning rate, each
# method's scale), 2 epochs, batch 64, classifier alignment on, bf16; 250 examples per class
# for training and for testing (GPU time). SuLoRA at 10 slots (the preset) and 5 slots
# (fusion frees a slot for every experience from the sixth on), SuLoRA without fusion at 14
# slots (one per task); the adapter-free frozen backbone, SimpleCIL and RanPAC (those two
# without classifier alignment, which would re-train their closed-form heads; task-incremental,
# one closed-form head per task).
#
#   MINILM=dir DATA=dir OUT=dir PARALLEL=n [CHECKPOINTS=dir] [RECORDED=dir] [SEEDS="0 1 2"] \
#     [STRATEGIES="..."] [DEVICE=cpu] [FIT=ridge|prototype] [SETS="..." TAG=name] [RETRIES=n] \
#     [SULORA_SETS="..." TAG=name] \
#     bash run.sh class|task
#
# STRATEGIES: the runs of these strategies only (names as in the jobs file: frozen sulora
# sulora-s5 sulora-nofusion sdlora sdlora-rr inflora olora inclora seqlora jointlora simplecil
# ranpac); DEVICE: the device (default cuda). FIT=ridge: every aligned run solves its head from
# the class statistics (alignment.fit=ridge) instead of SGD on sampled features, into
# <phase>-ridge/order<k>/ (SimpleCIL and RanPAC, which are not aligned, left out);
# task-incremental, each task's head from its own classes' (alignment.task_heads=true).
# FIT=prototype likewise, with each class's unit-length mean as its row (alignment.fit=prototype:
# on the frozen backbone, SimpleCIL), into <phase>-prototype/order<k>/.
# SETS: more config values for every run, named by TAG, the output folder's suffix; e.g.
# FIT=ridge SETS=backbone.random_features=10000 TAG=rf (RanPAC's classifier on every method's
# features) writes <phase>-ridge-rf/order<k>/; FIT=ridge SETS=alignment.random_features=10000
# TAG=rfsplit (RanPAC's split: a plain head trains, the projection feeds the solved head only;
# class-incremental) writes <phase>-ridge-rfsplit/order<k>/. A random-features run holds 5-9 GB
# of GPU memory: 15 side by side ran out on an 80 GB card, 14 did not. RETRIES (default 1): the
# runs that fail are started again once the others have ended, with half as many side by side.
# SULORA_SETS: config values for the SuLoRA runs only, after the study's own (e.g.
# SULORA_SETS=method.data_energy=0.3 TAG=e03), named by TAG like SETS.
# SEEDS: the run seeds of every order (default: seed k with order k only; "0 1 2" makes the
# full 3 seeds x 3 orders, seed by seed: a campaign cut short leaves whole seeds).
# RECORDED (e.g. study): records of runs already made, in the same <phase>[-FIT][-TAG]/order<k>/
# folders; they are copied into OUT and those runs are not made again.
set -euo pipefail
phase=$1
jobs=$(mktemp)
V=benchmarks/accuracy/variants
flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone $MINILM --batch-size 64"
flags="$flags --epochs 2 --limit-per-class 250 --set alignment.enabled=true"
flags="$flags training.eval_batch_size=256 --protocol $phase-incremental"
folder=$phase
if [[ -n ${FIT:-} ]]; then
  flags="$flags --set alignment.fit=$FIT" folder=$phase-$FIT
  [[ $phase == class ]] || flags="$flags alignment.task_heads=true"
fi
if [[ -n ${SETS:-}${SULORA_SETS:-} ]]; then
  [[ -n ${TAG:-} ]] || { echo "SETS and SULORA_SETS need TAG (the folder suffix)" >&2; exit 2; }
  folder=$folder-$TAG
  [[ -z ${SETS:-} ]] || flags="$flags --set $SETS"
fi
if [[ $phase == class ]]; then
  flags="$flags --lr 2e-3"
  sulora="method.alpha=4.0 method.allocator=data method.data_energy=0.9"
  sd=4.0 inf=8.0
else
  flags="$flags --lr 4e-3"
  sulora="method.alpha=2.0 method.allocator=data method.data_energy=0.9"
  sd=1.0 inf=10.0
fi
sulora="$sulora${SULORA_SETS:+ $SULORA_SETS}"

source benchmarks/accuracy/study.sh
add frozen frozen
add sulora sulora --set "$sulora"
add sulora-s5 $V/sulora-s5.yaml --set "$sulora"
add sulora-nofusion sulora-nofusion --set "$sulora" method.num_slots=14
add sdlora sdlora --set method.alpha=$sd
add sdlora-rr sdlora-rr --set method.alpha=$sd
add inflora inflora --set method.alpha=$inf
for strategy in olora inclora seqlora jointlora; do
  add $strategy $strategy
done
for strategy in simplecil ranpac; do
  [[ -n ${FIT:-} ]] || add $strategy $strategy --set alignment.enabled=false
done
write_jobs "$jobs" "$folder" long-text --order-seed "$flags"
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs-$phase.txt"
copy_recorded long-text "$folder"
run_campaign "$jobs"

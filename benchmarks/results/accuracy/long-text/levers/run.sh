#!/usr/bin/env bash
# SuLoRA's levers on the long text stream, on validation: stream order 0, seed 0 (SEED), 20% of each
# class's training examples held out (--validation 0.2) and evaluated instead of the test split.
# The base is the study's SuLoRA at 5 slots (sulora-s5, the study's settings per protocol: the
# data allocator at energy 0.9, alpha 4 class-incremental and 2 task-incremental; fusion frees a
# slot for every experience from the sixth on); each lever changes one thing and writes into its
# own folder <protocol>/<lever>/.
#
# Which pairs fusion folds (fusion_score, fusion, fusion_gamma) barely changes a class-incremental
# run with the data allocator: a fused pair keeps its exact contribution in the weight, and that
# allocator's new rows lie outside the earlier inputs' subspace, which holds most of the earlier
# slots' rows, whichever of them are live (all of them with method.data_keep_slot_rows=true;
# docs/methods.md). Under task-aware inference they can
# (a fused pair can no longer be left out of an earlier task's evaluation), so those levers run
# task-incremental; the others run class-incremental. References on the same split: SuLoRA
# without fusion (14 slots) and the adapter-free `frozen` (and RanPAC, class-incremental).
# The head's fit (alignment.fit=ridge: solved from the class moments instead of SGD on sampled
# features) is a lever of every method: its references are `frozen` and SD-LoRA with it.
#
# Task-incremental, each task's head can be aligned from its own classes' statistics
# (alignment.task_heads=true; with alignment.fit=ridge, solved in closed form): its references are
# `frozen` with it and the closed-form SimpleCIL and RanPAC.
# alignment.fit=prototype makes the head SimpleCIL's cosine classifier on the adapted features
# (on the frozen backbone it is SimpleCIL itself): does SuLoRA's adaptation improve on it?
# Its reference under another adapter method is SD-LoRA with it.
# backbone.random_features=10000 with alignment.fit=ridge puts RanPAC's classifier (random
# ReLU projection, ridge) on the adapted features; on `frozen` it is RanPAC (class/refs).
# alignment.random_features=10000 with alignment.fit=ridge is RanPAC's own split: the projection
# only under the solved head, a plain head for training (rp-split-head; SD-LoRA with it:
# class/refs-rp-split).
#
#   MINILM=dir DATA=dir OUT=dir PARALLEL=n [DEVICE=cuda] [EXTRA="..."] [EXTRA_SETS="..."] \
#     [SULORA_SETS="..."] [ONLY="task/ridge-heads class/refs:ranpac ..."] [SEED=k] bash run.sh
#
# ONLY: the runs of these folders only (FOLDER:STRATEGY: that strategy's run of the folder).
# SEED: the run seed of every run (default 0).
# EXTRA (run arguments) and EXTRA_SETS (config values) go to every run after the study's,
# SULORA_SETS to the SuLoRA runs only; e.g. the smaller pilot on a CPU (cpu-pilot/):
# DEVICE=cpu EXTRA="--precision fp32 --limit-per-class 60 --batch-size 16"
# EXTRA_SETS="backbone.max_length=64" SULORA_SETS="method.data_max_samples=64".
set -euo pipefail
jobs=$(mktemp)
seed=${SEED:-0}
V=benchmarks/accuracy/variants
flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone $MINILM"
flags="$flags --batch-size 64 --epochs 2 --limit-per-class 250 --validation 0.2 --order-seed 0"
flags="$flags ${EXTRA:-}"
sets="--set alignment.enabled=true training.eval_batch_size=256 ${EXTRA_SETS:-}"  # more follow
class="$flags --protocol class-incremental --lr 2e-3 $sets"
task="$flags --protocol task-incremental --lr 4e-3 $sets"
sulora="method.allocator=data method.data_energy=0.9 ${SULORA_SETS:-}"
sdlora_class="method.alpha=4.0"  # SD-LoRA's validated alpha per protocol
sdlora_task="method.alpha=1.0"
lever() {  # PROTOCOL LEVER EXTRA-SET-VALUES...
  local protocol=$1 name=$2; shift 2
  if [[ $protocol == class ]]; then
    echo "class/$name long-text $V/sulora-s5.yaml $seed $class $sulora method.alpha=4.0 $*" >> "$jobs"
  else
    echo "task/$name long-text $V/sulora-s5.yaml $seed $task $sulora method.alpha=2.0 $*" >> "$jobs"
  fi
}
lever class base
lever class recompose-10 method.recompose_every=10
lever class magnitudes method.slot_magnitudes=true
lever class orthogonal method.allocator=orthogonal
lever class principal method.allocator=principal
lever class rank2-slots10 method.rank=2 method.num_slots=10
lever class rank10-slots2 method.rank=10 method.num_slots=2
lever class alpha-2 method.alpha=2.0
lever class ridge-head alignment.fit=ridge
lever task base
lever task score-norm method.fusion_score=norm
lever task fraction-0.25 method.fusion=fraction method.fusion_gamma=0.25
lever task fraction-0.5 method.fusion=fraction method.fusion_gamma=0.5
lever task ridge-heads alignment.fit=ridge alignment.task_heads=true
# under task-aware inference a task reads only its own slot and the fused pairs: rows that
# overlap earlier inputs cost an earlier task only once fused, and may give each task more of
# its own inputs than the data allocator's rows outside them
lever task orthogonal method.allocator=orthogonal
lever task principal method.allocator=principal
lever task sampled-heads alignment.task_heads=true
lever class prototype-head alignment.fit=prototype
lever task prototype-heads alignment.fit=prototype alignment.task_heads=true
# the data allocator keeps every slot's rows in its input basis: rows that fusion frees are
# never given to a later slot (without it, a slot's rows beyond what the energy rule kept are)
lever class keep-slot-rows method.data_keep_slot_rows=true
lever class prototype-keep-slot-rows alignment.fit=prototype method.data_keep_slot_rows=true
lever task keep-slot-rows method.data_keep_slot_rows=true
# a smaller input basis (energy 0.3 keeps the fewest directions holding 30% of each task's input
# energy): later slots may take more of a new task's own energy, at more overlap with earlier
# tasks' inputs (which under task-aware inference reach an earlier task only once fused)
lever task energy-0.3 method.data_energy=0.3
lever task energy-0.6 method.data_energy=0.6
lever task energy-0.1 method.data_energy=0.1
# a gain on each new slot's update (data_gain_limit): the data allocator's rows may hold a few
# percent of a new task's input energy, so under AdamW its slot moves the layer's output far less
# per step than a slot on the task's top directions would; the gain sqrt(E_top / E_slot), capped,
# evens that out (a task learned late in the stream, like those of order 2, may need it)
lever class gain-4 method.data_gain_limit=4
lever class gain-16 method.data_gain_limit=16
lever task gain-4 method.data_gain_limit=4
lever task gain-16 method.data_gain_limit=16
lever task energy-0.1-gain-16 method.data_energy=0.1 method.data_gain_limit=16
lever task ridge-heads-gain-16 alignment.fit=ridge alignment.task_heads=true method.data_gain_limit=16
rp="backbone.random_features=10000 alignment.fit=ridge"
lever class rp-ridge-head $rp
lever task rp-ridge-heads $rp alignment.task_heads=true
split="alignment.random_features=10000 alignment.fit=ridge"
lever class rp-split-head $split
lever class rp-split-alpha-8 $split method.alpha=8.0
lever class rp-split-orthogonal $split method.allocator=orthogonal
lever class rp-split-principal $split method.allocator=principal
lever class rp-split-energy-0.7 $split method.data_energy=0.7
lever class rp-split-energy-0.3 $split method.data_energy=0.3
# SD-LoRA's learned magnitudes of earlier slots: a new task that resembles earlier ones may
# re-weight their directions where its own slot, outside their inputs, sees little
lever class rp-split-magnitudes $split method.slot_magnitudes=true
lever class rp-split-gain-4 $split method.data_gain_limit=4
lever class rp-split-gain-16 $split method.data_gain_limit=16
# class-incrementally a gained slot also moves earlier tasks' outputs through the share of their
# inputs outside the kept basis: a larger basis (energy 0.97, 0.99) leaves less of it, the gain
# makes up for the smaller share of the new task's energy that the slot then holds
lever class energy-0.97-gain-16 method.data_energy=0.97 method.data_gain_limit=16
lever class rp-split-energy-0.97-gain-16 $split method.data_energy=0.97 method.data_gain_limit=16
lever class rp-split-energy-0.99-gain-16 $split method.data_energy=0.99 method.data_gain_limit=16
echo "class/refs long-text sulora-nofusion $seed $class $sulora method.alpha=4.0 method.num_slots=14" >> "$jobs"
echo "class/refs long-text frozen $seed $class" >> "$jobs"
echo "class/refs long-text ranpac $seed $class alignment.enabled=false" >> "$jobs"
echo "class/refs-closed-form long-text simplecil $seed $class alignment.enabled=false" >> "$jobs"
# the ridge head on the frozen backbone and under SD-LoRA: is a gain SuLoRA's or the head's?
echo "class/refs long-text sdlora $seed $class $sdlora_class" >> "$jobs"
echo "class/refs-ridge long-text frozen $seed $class alignment.fit=ridge" >> "$jobs"
echo "class/refs-ridge long-text sdlora $seed $class $sdlora_class alignment.fit=ridge" >> "$jobs"
echo "class/refs-prototype long-text sdlora $seed $class $sdlora_class alignment.fit=prototype" >> "$jobs"
echo "class/refs-prototype long-text sulora-nofusion $seed $class $sulora method.alpha=4.0 method.num_slots=14 alignment.fit=prototype" >> "$jobs"
echo "class/refs-rp-ridge long-text sdlora $seed $class $sdlora_class $rp" >> "$jobs"
echo "class/refs-rp-split long-text sdlora $seed $class $sdlora_class $split" >> "$jobs"
echo "task/refs long-text sulora-nofusion $seed $task $sulora method.alpha=2.0 method.num_slots=14" >> "$jobs"
echo "task/refs long-text frozen $seed $task" >> "$jobs"
echo "task/refs-ridge-heads long-text frozen $seed $task alignment.fit=ridge alignment.task_heads=true" >> "$jobs"
echo "task/refs-ridge-heads long-text sdlora $seed $task $sdlora_task alignment.fit=ridge alignment.task_heads=true" >> "$jobs"
echo "task/refs-prototype-heads long-text sdlora $seed $task $sdlora_task alignment.fit=prototype alignment.task_heads=true" >> "$jobs"
echo "task/refs-sdlora long-text sdlora $seed $task $sdlora_task" >> "$jobs"
echo "task/refs-closed-form long-text simplecil $seed $task alignment.enabled=false" >> "$jobs"
echo "task/refs-closed-form long-text ranpac $seed $task alignment.enabled=false" >> "$jobs"
if [[ -n ${ONLY:-} ]]; then
  kept=$(mktemp)
  while read -r line; do
    read -r folder _ strategy _ <<< "$line" && strategy=${strategy##*/}
    [[ " $ONLY " == *" $folder "* || " $ONLY " == *" $folder:${strategy%.yaml} "* ]] \
      && echo "$line" >> "$kept"
  done < "$jobs"
  mv "$kept" "$jobs"
fi
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs.txt"
python3 -m benchmarks.accuracy.campaign --jobs "$jobs" --parallel "$PARALLEL" --out "$OUT"

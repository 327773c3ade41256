#!/usr/bin/env bash
# The slot rows centred (method.data_centred_rows=true) at the long-text study's scale,
# class-incremental under the split head (alignment.random_features=10000, alignment.fit=ridge:
# study-rfsplit/), every stream order 0, 1, 2 with seeds 0, 1, 2:
#   val/  on validation (--validation 0.2: 20% of each class's training examples held out):
#         SuLoRA at 5 slots with the rows centred (rows-centred/), the same uncentred
#         (uncentred/) and SD-LoRA (sdlora/); 27 runs. This is where the lever is judged: a
#         preset takes it only if it gains in the mean of every order.
#   test/ on the test split, as the study: SuLoRA at 5 slots with the rows centred and
#         uncentred (18 runs), to set beside the study's records of every method.
# Every run goes through ../confusion.py, which also writes where each new task's errors go into
# confusion/<same folders>/<record name>.json. The study's settings otherwise: 250 examples per
# class, batch 64, 2 epochs, bf16, lr 2e-3, the data allocator at energy 0.9, alpha 4 (SuLoRA and
# SD-LoRA alike). Single-process runs, PARALLEL side by side (a split-head run holds 5-9 GB of
# GPU memory: 14 fit on an 80 GB card).
#
#   MINILM=dir DATA=dir OUT=dir PARALLEL=n [DEVICE=cuda] [EXTRA="..."] [SEEDS="0 1 2"] \
#     [PHASES="val test"] bash benchmarks/results/accuracy/long-text/levers/centred.sh
#   (from the repository root)
#
# EXTRA: more run arguments (e.g. "--limit-per-class 6 --epochs 1" for a smoke test). Started
# again with the same OUT, the runs that finished (their .done files) are not made again.
set -euo pipefail
here=benchmarks/results/accuracy/long-text
s5=benchmarks/accuracy/variants/sulora-s5.yaml
flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone $MINILM"
flags="$flags --batch-size 64 --epochs 2 --limit-per-class 250 --protocol class-incremental"
flags="$flags --lr 2e-3 --no-report ${EXTRA:-}"
sets="alignment.enabled=true training.eval_batch_size=256 alignment.random_features=10000"
sets="$sets alignment.fit=ridge"
sulora="method.allocator=data method.data_energy=0.9 method.alpha=4.0"
jobs=$(mktemp)

# job PHASE VARIANT STRATEGY SEED ORDER SET-VALUES...: one line of the jobs file
job() {
  local phase=$1 variant=$2 strategy=$3 seed=$4 k=$5; shift 5
  local folder=$phase/$variant/order$k split="" name
  [[ $phase == val ]] && split="--validation 0.2"
  name=$(basename "$strategy" .yaml)__seed$seed
  [[ -e $OUT/$folder/$name.done ]] && return
  echo "$OUT/$folder $name python $here/confusion.py $OUT/confusion/$folder/$name.json run" \
    "--benchmark long-text --strategy $strategy --seed $seed --out $OUT/$folder" \
    "--order-seed $k $flags $split --set $sets $*" >> "$jobs"
}
for phase in ${PHASES:-val test}; do
  for seed in ${SEEDS:-0 1 2}; do
    for k in 0 1 2; do
      job "$phase" rows-centred $s5 "$seed" "$k" $sulora method.data_centred_rows=true
      job "$phase" uncentred $s5 "$seed" "$k" $sulora
      [[ $phase == val ]] && job "$phase" sdlora sdlora "$seed" "$k" method.alpha=4.0
    done
  done
done
mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs.txt"
echo "$(wc -l < "$jobs") runs, $PARALLEL side by side"
# each line: FOLDER NAME COMMAND...; the run's output goes to FOLDER/NAME.log, FOLDER/NAME.done
# marks it finished
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
while read -r folder name command; do
  log=$folder/$name.log
  printf '%s\0' "mkdir -p $folder $OUT/confusion/${folder#"$OUT"/} && $command > $log 2>&1 \
&& touch $folder/$name.done && echo ok $name || echo FAILED $name"
done < "$jobs" | xargs -0 -P "$PARALLEL" -I{} bash -c {}

# Sourced by the long split-CIFAR-100 studies (benchmarks/results/accuracy/cifar100-20/run.sh,
# cifar100-50/run.sh): every method side by side over three class orders (class-order seeds 0,
# 1, 2), at the 10-experience table's settings (recipe cifar100-10: lr 1e-3, 2 epochs, batch
# 128, bf16, classifier alignment on, off for SimpleCIL and RanPAC, whose heads are closed-form;
# evaluation batch 2048). Reads VIT, DATA, OUT, PARALLEL and the options of study.sh (SEEDS,
# STRATEGIES, RECORDED, CHECKPOINTS, RETRIES), DEVICE (default cuda) and EXTRA (more arguments
# for every run, e.g. "--num-experiences 3 --limit-per-class 4" for a smoke test). On one 80 GB
# GPU, 16 runs side by side fit; 24 ran out of memory.
source benchmarks/accuracy/study.sh

# cifar_study BENCHMARK SLOTS VARIANT...: BENCHMARK's study: `frozen`, SuLoRA at its preset (10
# slots), at each VARIANT (a file of benchmarks/accuracy/variants/, e.g. sulora-s5) and without
# fusion at SLOTS slots (one per experience), then every baseline; runs into OUT/order<k>/
cifar_study() {
  local benchmark=$1 slots=$2 jobs flags variant strategy
  shift 2
  jobs=$(mktemp)
  flags="--device ${DEVICE:-cuda} --precision bf16 --data-root $DATA --backbone-weights $VIT"
  flags="$flags --epochs 2 --batch-size 128 --lr 1e-3 --set alignment.enabled=true"
  flags="$flags training.eval_batch_size=2048${EXTRA:+ $EXTRA}"
  add frozen frozen
  add sulora sulora
  for variant in "$@"; do
    add "$variant" "benchmarks/accuracy/variants/$variant.yaml"
  done
  add sulora-nofusion sulora-nofusion --set method.num_slots="$slots"
  for strategy in sdlora sdlora-rr inflora olora inclora seqlora jointlora; do
    add $strategy $strategy
  done
  for strategy in simplecil ranpac; do
    add $strategy $strategy --set alignment.enabled=false
  done
  write_jobs "$jobs" "" "$benchmark" --class-order-seed "$flags"
  mkdir -p "$OUT" && cp "$jobs" "$OUT/jobs.txt"
  copy_recorded "$benchmark" ""
  run_campaign "$jobs"
}

# Sourced by the study scripts (benchmarks/results/accuracy/*/run.sh): a study is a list of runs
# (`add`), each made in the stream orders 0, 1, 2 and its seeds (`write_jobs`); the script then
# hands the jobs file to `python -m benchmarks.accuracy.campaign --jobs` (`run_campaign`).

runs=()

# add NAME STRATEGY [ARGS...]: a run of STRATEGY (a preset name or a preset file) with ARGS in
# every order and seed, unless STRATEGIES (a list of NAMEs) leaves NAME out
add() {
  [[ -n ${STRATEGIES:-} && " $STRATEGIES " != *" $1 "* ]] || runs+=("${*:2}")
}

# write_jobs FILE FOLDER BENCHMARK ORDER_FLAG FLAGS: append a job line per order, seed and run
# to FILE: order k's runs write into FOLDER/order<k> (order<k> for an empty FOLDER) and take
# `ORDER_FLAG k` after FLAGS. Seeds: seed k in order k, or every seed of SEEDS in each order,
# seed by seed (a campaign cut short leaves whole seeds).
write_jobs() {
  local file=$1 folder=${2:+$2/} benchmark=$3 order_flag=$4 flags=$5
  local pairs=() pair k seed run strategy args
  if [[ -n ${SEEDS:-} ]]; then
    for seed in $SEEDS; do for k in 0 1 2; do pairs+=("$k $seed"); done; done
  else
    for k in 0 1 2; do pairs+=("$k $k"); done
  fi
  for pair in "${pairs[@]}"; do
    read -r k seed <<< "$pair"
    for run in "${runs[@]}"; do
      read -r strategy args <<< "$run"
      echo "${folder}order$k $benchmark $strategy $seed $flags $order_flag $k${args:+ $args}"
    done
  done >> "$file"
}

# copy_recorded BENCHMARK FOLDER: with RECORDED set (a folder of records made before, in
# FOLDER/order<k>/ as here), copy each record into OUT/FOLDER/order<k>/ and mark its run done,
# so that the campaign does not make it again
copy_recorded() {
  local benchmark=$1 folder=${2:+$2/} record dest
  for record in "${RECORDED:-/nowhere}"/"$folder"order*/*.json; do
    [[ -e $record ]] || continue
    dest="$OUT/${record#"$RECORDED"/}" && dest=${dest%/*}
    mkdir -p "$dest" && cp "$record" "$dest/"
    touch "$dest/$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print("%s__%s__seed%d.done" % (sys.argv[2], r["strategy"], r["seed"]))' "$record" "$benchmark")"
  done
}

# run_campaign JOBS: the campaign of the jobs file JOBS, PARALLEL runs side by side, into OUT;
# with CHECKPOINTS set, every run checkpoints there after each experience, so that a campaign
# cut short and started again resumes its unfinished runs. The runs that fail are started again
# once the others have ended, with half as many side by side, up to RETRIES times (default 1):
# runs crowded out of the GPU's memory then finish
run_campaign() {
  local resume=()
  [[ -n ${CHECKPOINTS:-} ]] && resume=(--checkpoint-root "$CHECKPOINTS")
  python3 -m benchmarks.accuracy.campaign --jobs "$1" --parallel "$PARALLEL" --out "$OUT" \
    --retries "${RETRIES:-1}" "${resume[@]}"
}

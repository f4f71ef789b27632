#!/usr/bin/env bash
# Issue 17 on one GPU (BENCHMARKS.md, "Packing and length buckets"): (1) bench.packing on the
# 370M backbone, padded (the fixed-length rate) vs packing (lookahead window PACK_WINDOW, and
# the greedy in-order packer) vs length buckets, in COMPUTE_DTYPE, then, if BF16_TIMEOUT > 0,
# the same modes in bfloat16; (2) unless PART2=0, stage 3 of the demo with packing off and
# on, the same examples seen (bench.packing_runs), a third run packed at 8 rows a step if
# time is left. Every figure lands under $OUT. Settings through the environment:
#   OUT=out EXAMPLES=64 bash scripts/bench_packing.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
D=${P17_DIR:-/tmp/p17}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-140}
MODEL=${MODEL:-370m}; MAX_TOKENS=${MAX_TOKENS:-32768}; EXAMPLES=${EXAMPLES:-48}; S=${S:-2048}
COMPUTE_DTYPE=${COMPUTE_DTYPE:-bfloat16}; PACK_WINDOW=${PACK_WINDOW:-16}
BUCKET_MULTIPLE=${BUCKET_MULTIPLE:-$S}; BUCKET_RATIO=${BUCKET_RATIO:-2}; BF16_TIMEOUT=${BF16_TIMEOUT:-0}
MODES=${MODES:-padded,packing_greedy,packing,buckets,padded+resets}; BF16_MODES=${BF16_MODES:-$MODES}
STEPS=${STEPS:-300}; EVAL_EVERY=${EVAL_EVERY:-50}
mkdir -p $D $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
git rev-parse HEAD 2>/dev/null; date -u
echo "== part 1: bench.packing (timeout ${BENCH_TIMEOUT}s) =="
bench() {  # timeout, dtype, json, log, modes
  timeout $1 $PY -m ma2mba_jax.bench.packing --model $MODEL --max_tokens $MAX_TOKENS \
    --examples $EXAMPLES --batch 1 --time_block $S --bucket_multiple $BUCKET_MULTIPLE \
    --bucket_ratio $BUCKET_RATIO --pack_window $PACK_WINDOW --padded_batches 4 --repeats 2 \
    --compute_dtype $2 --modes $5 --json $3 > $4 2>&1
  echo "bench ($2) rc=$? at ${SECONDS}s"; grep -v -i "warning" $4 | tail -8
}
bench $BENCH_TIMEOUT $COMPUTE_DTYPE $OUT/packing_bench.json $OUT/bench.log $MODES
if [ "$BF16_TIMEOUT" -gt 0 ]; then
  echo "== part 1b: bench.packing in bfloat16 (timeout ${BF16_TIMEOUT}s) =="
  bench $BF16_TIMEOUT bfloat16 $OUT/packing_bench_bf16.json $OUT/bench_bf16.log $BF16_MODES
fi
if [ "${PART2:-1}" = 0 ]; then echo "done at ${SECONDS}s (PART2=0)"; exit 0; fi
echo "== part 2: stage 3 demo, packing off / on =="
$PY -c "from ma2mba_jax import demo; demo.make_data('$D/data')" > $OUT/data.log 2>&1 || { tail $OUT/data.log; exit 1; }
echo "data at ${SECONDS}s"
EXAMPLES3=$((STEPS * 8))
M=$($PY -m ma2mba_jax.bench.packing_runs steps --data_dir=$D/data --examples=$EXAMPLES3 --rows=3 2>$OUT/steps.log) || { tail $OUT/steps.log; exit 1; }
cat $OUT/steps.log | tail -1
COMMON="--config.data.synthetic_dir=$D/data --config.data.num_workers=4 --config.eval.batches=100 --config.eval.every_steps=$EVAL_EVERY --config.train.log_every=10 --config.ckpt.every_steps=100000 --config.remat.planner=model"
run() {  # name, extra flags
  local name=$1; shift
  $PY -m ma2mba_jax.main --config=configs/stage3.py:demo --workdir=$D/$name $COMMON "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"; grep "validation loss" $OUT/$name.log | tail -1
  cp $D/$name/metrics.jsonl $OUT/$name.metrics.jsonl 2>/dev/null
}
run unpacked --config.train.steps=$STEPS
run packed --config.data.packing=True --config.optim.global_batch=3 --config.optim.micro_batch=3 --config.train.steps=$M --config.eval.every_steps=$((EVAL_EVERY * 8 / 9))
$PY -m ma2mba_jax.bench.packing_runs compare --unpacked $D/unpacked --packed $D/packed --json $OUT/stage3_compare.json
if [ $SECONDS -lt ${THIRD_BEFORE:-230} ]; then
  M8=$($PY -m ma2mba_jax.bench.packing_runs steps --data_dir=$D/data --examples=$EXAMPLES3 --rows=8 2>>$OUT/steps.log)
  run packed8 --config.data.packing=True --config.train.steps=$M8 --config.eval.every_steps=$((EVAL_EVERY / 3))
  $PY -m ma2mba_jax.bench.packing_runs compare --unpacked $D/unpacked --packed $D/packed8 --json $OUT/stage3_compare_rows8.json
fi
echo "done at ${SECONDS}s"

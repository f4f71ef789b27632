#!/usr/bin/env bash
# Session 10, call b (nvidia-h100-x1): issue 19's decoding. The mixer kernel now issues
# every load before its stores and can split a head over programs (bench.mixer); the GEMVs
# can load tiles one step ahead and with evict_first (bench.gemv --sweep=evict); then the
# 2.7B LM's decoding with those settings patched in, one variant a process.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
python -m ma2mba_jax.bench.mixer --preset=2.7b --splits=1,2,4,8 --warps=1,2,4 \
  --profile_dir=/tmp/mprof --json="$OUT/mixer_b.json" 2>&1 | $F | tail -16
python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=evict --profile_dir=/tmp/gprof \
  --json="$OUT/gemv_evict_b.json" 2>&1 | $F | grep -v "^\[" | tail -34
for v in v0_current v1_evict_ahead v2_evict_ahead_split2 v3_evict_ahead_split4 v4_evict; do
  python docs/bench/h100_r10/decode_variants.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_gemv --loops=device --count_kernels= --repeats=3 \
    --json="$OUT/decode_$v.json" 2>&1 | $F | tail -1
done

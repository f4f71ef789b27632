#!/usr/bin/env bash
# Session 10, call c (nvidia-h100-x1): issue 19's decoding. The GEMVs with persistent
# programs (Config.programs: the input normalised once a program, not once a column
# block), then the 2.7B LM's decoding with them patched in, one variant a process.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=persistent --profile_dir=/tmp/gprof \
  --json="$OUT/gemv_persistent_c.json" 2>&1 | $F | grep -v "^\[" | tail -40
for v in v2_evict_ahead_split2 v5_persistent264 v6_persistent528 v7_persistent1056; do
  python docs/bench/h100_r10/decode_variants.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_gemv --loops=device --count_kernels= --repeats=3 \
    --json="$OUT/decode_c_$v.json" 2>&1 | $F | tail -1
done

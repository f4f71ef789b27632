#!/usr/bin/env bash
# Session 10, call d (nvidia-h100-x1): issue 19's decoding. The mixer kernel's extra
# programs read the first rows of out_proj's matrix into the L2 (pallas.TOUCH, a fraction of
# its rows) while the mixer runs; the 2.7B LM's decoding, one variant a process.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
for v in v2_evict_ahead_split2 v8_touch50 v9_touch100 v10_touch25 v11_p528in_touch50 \
         v12_touch50_outk512 v2_evict_ahead_split2; do
  python docs/bench/h100_r10/decode_variants.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_gemv --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$v --json="$OUT/decode_d_$v.json" 2>&1 | $F | grep "us \|$v" | tail -9
done

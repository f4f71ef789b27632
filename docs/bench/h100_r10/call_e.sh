#!/usr/bin/env bash
# Session 10, call e (nvidia-h100-x1): issue 19's decoding. Candidate defaults: in_proj with
# 528 persistent programs, out_proj evict_first + ahead, the mixer split 2-8 ways, touch
# 0-0.5; the 2.7B LM's decoding with kernel profiles, one variant a process.
set -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
F="grep -v ^I1127\|^W1127\|^E1127\|^I1128\|^W1128\|^E1128\|warnings.warn\|^WARNING"
for v in v11_p528in_touch50 va_p528_s2_t25 vb_p528_s8w4_t25 vc_p528_s4w2_t0 vd_p528_s4w2_t25 \
         v2_evict_ahead_split2; do
  python docs/bench/h100_r10/decode_variants.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_gemv --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$v --json="$OUT/decode_e_$v.json" 2>&1 | $F | grep "us \|$v" | grep -v "^  *1\.[0-9] us" | tail -16
done

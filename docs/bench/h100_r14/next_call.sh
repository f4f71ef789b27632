# For the next session (not run in session 14: no device time left): which part of the LM
# computation slows the decode afterwards. Call h: the plain-XLA SSD alone does (even at
# 1,024 tokens), the Pallas SSD kernels alone do not; the LM stage ran the jax-triton SSD
# kernels (ssd_impl "auto" is "triton" on GPU). One process a stage, ~75 s each.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
for stage in ssd_triton_9216 segsum_9216 bmm_9216 lmssd_pallas lmssd_triton; do
  ORDER=$stage timeout 110 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_next_$stage.txt 2>&1; f $OUT/limits_next_$stage.txt
done

# Session 15, call b: call a found that the LM with the Pallas SSD leaves the decode as fast
# (2.407 -> 2.399 ms/token) while the LM with the jax-triton SSD (ssd_impl "auto") slows it
# (2.413 -> 2.480); resetting persisting L2 lines, an L2 flush and autotuning off did not
# matter. Hypothesis: large-shared-memory Triton kernels leave the SMs' shared-memory
# carveout at its largest and the decode's kernels then run (or reconfigure) under it.
# Expected (written before the call): carve_shared from a clean start slows the decode like
# the LM does (~+3%); carve_l1 after it and after the LM brings it back; the jax-triton SSD
# alone slows it.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
ORDER=carve_shared,carve_l1 timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_b_carve.txt 2>&1; f $OUT/limits_b_carve.txt 5
ORDER=lm,carve_l1 timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_b_lm_carve.txt 2>&1; f $OUT/limits_b_lm_carve.txt 5
ORDER=ssd_triton_9216 timeout 110 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_b_ssd_triton.txt 2>&1; f $OUT/limits_b_ssd_triton.txt 3

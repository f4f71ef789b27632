# Session 14, call g: does any executable with an XLA while loop slow the decode afterwards?
# (Calls e, f: a 20 GiB make-and-free, 200 small executables, a big matmul by cuBLAS or
# Triton, exp(cumsum) fusions did not; the LM layers (a scan over layers) and the plain-XLA
# SSD (a scan over chunks) did.) One process a stage.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-6}; }
for stage in loop_small loop_big; do
  ORDER=$stage timeout 130 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_g_$stage.txt 2>&1; f $OUT/limits_g_$stage.txt
done

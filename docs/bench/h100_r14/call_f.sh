# Session 14, call f: which part of an LM computation slows the decode afterwards (call e:
# not a 20 GiB make-and-free, not 200 small executables, not the BFC allocator). One
# process a stage (the effect stays once made): a big matmul by cuBLAS, the same by XLA's
# Triton GEMM, and exp(cumsum) fusions without a matmul.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-6}; }
for stage in mm_cublas mm_triton cumsum; do
  ORDER=$stage timeout 130 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_f_$stage.txt 2>&1; f $OUT/limits_f_$stage.txt
done

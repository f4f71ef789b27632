# Session 14, call a: (1) raw Triton GEMVs (jax-triton) against XLA's reduction at the
# 3.1B model's in_proj shape; (2) whether the decode slowdown after an LM computation
# follows a CUDA context limit (stack size) or the LM executable staying loaded.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
timeout 230 python docs/bench/h100_r14/triton_gemv.py 2>&1 | grep -v "^W\|^I1\|^ *$"
ORDER=lmdel,stack_reset timeout 150 python docs/bench/h100_r14/ctx_limits.py 2>&1 | grep -v "^W\|^I1\|^ *$"
ORDER=stack_big,stack_reset timeout 120 python docs/bench/h100_r14/ctx_limits.py 2>&1 | grep -v "^W\|^I1\|^ *$"

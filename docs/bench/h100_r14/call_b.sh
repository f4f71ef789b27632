# Session 14, call b: the Triton in_proj (triton_gemv.in_proj_stream) checked on the GPU
# (its own test, the fused steps and the greedy loops that now run it), then timed against
# XLA's reduction in one process before and after a video (ab_decode.py); then the context
# limits around an LM computation (ctx_limits.py, lmdel only: call a's output was lost to a
# launch failure in a later stage).
# Expected (written before the call): in_proj 21.1 -> ~19.6 us a layer, ~96 us a token:
# 2.7B-shaped LM from zero states 414 -> ~430 tok/s, after a video ~397 -> ~413.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
JAX_PLATFORMS=cuda,cpu timeout 200 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py \
  -k "stream or triton or reduce or greedy or fused_step" > $OUT/tests_b.txt 2>&1; tail -3 $OUT/tests_b.txt
timeout 240 python docs/bench/h100_r14/ab_decode.py > $OUT/ab_b.txt 2>&1; grep -v "^W\|^I1\|^ *$" $OUT/ab_b.txt | tail -22
ORDER=lmdel timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_b.txt 2>&1; grep -v "^W\|^I1\|^ *$" $OUT/limits_b.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -12

# Ran with carveout_fix.patch applied (and ctx_limits.py passing prefer_shared=PREFER_SHARED
# to its Sampler); the change was dropped after this call.
# Session 15, call c: the fix (Sampler(prefer_shared=True), the default on a GPU: a no-op
# kernel with the most dynamic shared memory before each answer's loop;
# kernels/decode/carveout.py). Call b: a no-op with the carveout preference 0 (most L1)
# slowed the decode like the LM does (2.390 -> 2.467 ms/token); one with 200 KiB of shared
# memory did not.
# Expected (written before the call): with the fix the decode after the LM (and after the
# most-L1 no-op) stays at the "before" speed (~2.39-2.41 ms/token, ~413 tok/s at 256);
# without it (PREFER_SHARED=0), ~2.47-2.50; the acceptance run's fused_mixed goes from
# ~397 to ~410 tok/s after the 16K-token video.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
JAX_PLATFORMS=cuda,cpu timeout 150 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py \
  -k "prefer_shared or greedy" > $OUT/tests_c.txt 2>&1; tail -2 $OUT/tests_c.txt
ORDER=lm,carve_l1 timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_c_fix.txt 2>&1; f $OUT/limits_c_fix.txt 5
PREFER_SHARED=0 ORDER=lm timeout 100 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_c_nofix.txt 2>&1; f $OUT/limits_c_nofix.txt 3
timeout 200 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_c.json > $OUT/infer_c.txt 2>&1
grep -v "^W\|^I1\|^ *$" $OUT/infer_c.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -14

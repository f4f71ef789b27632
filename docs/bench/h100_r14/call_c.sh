# Session 14, call c: in_proj_stream rewritten as a Pallas kernel (call b: the raw Triton
# kernel through jax-triton made the decode loop slower, 2.40 -> 2.65 ms a token: XLA does
# not capture jax-triton's custom call in its command buffers, so every layer split the
# loop's CUDA graph). GPU tests; the kernel alone (bench.gemv xla_reduce / pallas_stream,
# profiled); the decode A/B before and after a video.
# Expected: the Pallas kernel ~19.6-20 us (what the raw Triton one took alone), in the
# loop ~1.5 us a layer less than XLA's reduction: ~2.40 -> ~2.31 ms a token.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
JAX_PLATFORMS=cuda,cpu timeout 200 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py \
  -k "stream or runs_the_kernel or reduce or greedy or fused_step" > $OUT/tests_c.txt 2>&1; tail -3 $OUT/tests_c.txt
timeout 120 python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=defaults --profile_dir=/tmp/gprof \
  --json=$OUT/gemv_c.json > $OUT/gemv_c.txt 2>&1; grep "in_proj |" $OUT/gemv_c.txt
timeout 240 python docs/bench/h100_r14/ab_decode.py > $OUT/ab_c.txt 2>&1; grep -v "^W\|^I1\|^ *$" $OUT/ab_c.txt | tail -16

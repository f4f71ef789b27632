# For the next session (written in session 15, smoke-run on CPU with PRESET=tiny, not run
# on the GPU: no device time left). Session 15 found that the LM layers slow the decode
# after them with the jax-triton SSD kernels (custom calls inside the scan's XLA while loop
# over the layers, between command buffers) and not with the Pallas ones (kernel thunks,
# captured in the command buffers); the jax-triton SSD alone does not. Does the unrolled
# layer loop (no while loop) with the jax-triton SSD leave the decode as fast? If so, the
# Streamer's layer_loop="unrolled" may keep both the prefill's speed (jax-triton) and the
# decode's. One process a stage, ~80 s each; then the prefill with each layer loop, one
# process each (a process's decode is slowed for good by a scan prefill).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
ORDER=lmunrolled timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_next_unrolled.txt 2>&1; f $OUT/limits_next_unrolled.txt 3
for loop in scan unrolled; do
  timeout 200 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=64 \
    --layer_loops=$loop --decode_impls=device,device_fused_mixed --decode_tokens=256 \
    --decode_repeats=3 --repeats=3 --json=$OUT/infer_next_$loop.json > $OUT/infer_next_$loop.txt 2>&1
  grep -v "^W\|^I1\|^ *$" $OUT/infer_next_$loop.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -3
done

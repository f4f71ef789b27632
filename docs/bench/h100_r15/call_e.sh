# Session 15, call e: call d once more on another machine (is the trade-off reproducible?):
# the 3.1B model on a 131K-token video, the prefill's SSD by jax-triton ("auto") and by the
# project's Pallas kernels, then 256 greedy tokens (old unrolled loop and fused_mixed).
# Expected (written before the call): as call d: pallas prefill ~2% slower (45.7K -> 44.8K
# tokens/s), its decode ~2.7% faster (402 -> 413 tok/s), the unrolled loop ~9% faster.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for impl in auto pallas; do
  timeout 145 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=64 \
    --decode_impls=device,device_fused_mixed --decode_tokens=256 --ssd_impl=$impl \
    --decode_repeats=3 --repeats=3 --json=$OUT/infer_e_$impl.json > $OUT/infer_e_$impl.txt 2>&1
  grep -v "^W\|^I1\|^ *$" $OUT/infer_e_$impl.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -3
done

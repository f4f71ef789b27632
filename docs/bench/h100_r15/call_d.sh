# Session 15, call d: the prefill's SSD backend as the trigger. Call a: the LM layers with
# ssd_impl="pallas" left the decode as fast (2.407 -> 2.399 ms/token), with "triton" (what
# "auto" picks) slowed it (2.413 -> 2.480). Call c: the carveout no-op before each answer
# (not kept) made the decode slow from the start (2.482 against 2.384 without it).
# Expected (written before the call): with --ssd_impl=pallas the 3.1B model decodes at
# ~410 tok/s after the video (256 tokens) against ~397-401 with triton; the prefill is a
# little slower with pallas (its SSD forward is ~15% slower than triton's, ~8% of the LM
# layers' time: ~1%, 46-47K -> ~45.5-46.5K tokens/s at 131K).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for impl in auto pallas; do
  timeout 260 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384,131072 --frames_per_step=64 \
    --decode_impls=device,device_fused_mixed --decode_tokens=256 --ssd_impl=$impl \
    --decode_repeats=3 --repeats=3 --json=$OUT/infer_d_$impl.json > $OUT/infer_d_$impl.txt 2>&1
  grep -v "^W\|^I1\|^ *$" $OUT/infer_d_$impl.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -6
done

# Session 16, call a: session 15's next_call.sh as written (does the unrolled layer loop
# with the jax-triton SSD leave the decode as fast?).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
ORDER=lmunrolled timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_next_unrolled.txt 2>&1; f $OUT/limits_next_unrolled.txt 3
for loop in scan unrolled; do
  timeout 200 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=64 \
    --layer_loops=$loop --decode_impls=device,device_fused_mixed --decode_tokens=256 \
    --decode_repeats=3 --repeats=3 --json=$OUT/infer_next_$loop.json > $OUT/infer_next_$loop.txt 2>&1
  grep -v "^W\|^I1\|^ *$" $OUT/infer_next_$loop.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -3
done

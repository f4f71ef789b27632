# For the next session (written in session 16 after its device time was spent; smoke-run on
# CPU only). The acceptance rerun with bench.infer's random frames made before the prefill's
# clock starts (bench/infer.frame_pool; until now each timed prefill also made 4 x 64 random
# 336x336 frames on the host, 0.4-0.6 s on a 2-core CPU, while the GPU idled): the default
# (Pallas SSD on a GPU, tuned), then jax-triton's SSD (the default before session 16) and the
# old unrolled decode loop (device) in the same call; one process each. ~300 s.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -${2:-3}; }
for impl in default triton; do
  flag=$([ $impl = triton ] && echo --ssd_impl=triton)
  lengths=$([ $impl = default ] && echo 16384,131072 || echo 131072)
  timeout 190 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=$lengths --frames_per_step=64 \
    --decode_impls=device,device_fused_mixed --decode_tokens=256 --decode_repeats=3 --repeats=3 \
    $flag --json=$OUT/infer_next_$impl.json > $OUT/infer_next_$impl.txt 2>&1
  echo "== $impl"; grep "decode device" $OUT/infer_next_$impl.txt | cut -c60-; g $OUT/infer_next_$impl.txt 2
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['ssd_impl'], d['step_parts'])" $OUT/infer_next_$impl.json
done

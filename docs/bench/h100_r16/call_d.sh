# Session 16, call d: the Pallas SSD with its tuned forward settings (TUNED_OPTIONS:
# chunk_state 4 warps, chunk_scan_fwd 1 stage). (1) each forward kernel alone, new and old
# settings and jax-triton's; (2) the GPU check against the f64 oracle (poisoned memory);
# (3) the acceptance run with the Pallas SSD, then jax-triton's (the default until now), the
# old unrolled decode loop (device) rerun in each; one process each.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -${2:-3}; }
timeout 100 python -m ma2mba_jax.bench.ssd --breakdown \
  --impl=pallas,pallas:warps_state=8:stages_chunk_fwd=2,triton --lengths=9216 --heads=80 \
  --kernels=chunk_state,state_pass,chunk_scan_fwd --json=$OUT/ssd_d.json > $OUT/ssd_d.txt 2>&1
grep "^{" $OUT/ssd_d.txt | grep -v reverse | sed "s/'H': 80, 'T': 9216, //"
timeout 150 python -m ma2mba_jax.bench.ssd_check --impls=pallas --seed=1616 \
  --json=$OUT/check_d.json > $OUT/check_d.txt 2>&1; g $OUT/check_d.txt 24
for impl in pallas auto; do
  timeout 185 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 --frames_per_step=64 \
    --decode_impls=device,device_fused_mixed --decode_tokens=256 --decode_repeats=3 --repeats=3 \
    --ssd_impl=$impl --json=$OUT/infer_d_$impl.json > $OUT/infer_d_$impl.txt 2>&1
  echo "== ssd $impl"; grep "decode device" $OUT/infer_d_$impl.txt | cut -c60-; g $OUT/infer_d_$impl.txt 1
  python -c "import json,sys; print(json.load(open(sys.argv[1]))['step_parts'])" $OUT/infer_d_$impl.json
done

# Session 16, call e: the acceptance run on the committed tree, where bench.infer (as
# generate and evaluate) now reads videos with the Pallas SSD on a GPU; jax-triton's SSD (the
# default before) and the old unrolled decode loop (device) rerun in the same call; one
# process each.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -${2:-3}; }
for impl in default triton; do
  flag=$([ $impl = triton ] && echo --ssd_impl=triton)
  lengths=$([ $impl = default ] && echo 16384,131072 || echo 131072)
  timeout 190 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=$lengths --frames_per_step=64 \
    --decode_impls=device,device_fused_mixed --decode_tokens=256 --decode_repeats=3 --repeats=3 \
    $flag --json=$OUT/infer_e_$impl.json > $OUT/infer_e_$impl.txt 2>&1
  echo "== $impl"; grep "decode device" $OUT/infer_e_$impl.txt | cut -c60-; g $OUT/infer_e_$impl.txt 2
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['ssd_impl'], d['step_parts'])" $OUT/infer_e_$impl.json
done

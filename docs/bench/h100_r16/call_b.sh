# Session 16, call b: the LM frame step's scan over layers copies each layer's weights out of
# the [64, ...] stacks (6 MemcpyD2D a layer, 5.3 ms of a 69 ms step at M=32 in session 9's
# profile). Does XLA's dynamic-slice fusion (the GEMMs read the slice in place) remove the
# copies and speed the prefill? Pallas SSD (the decode stays fast after it) without and with
# the flag, then jax-triton with it; one process each.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -${2:-3}; }
run() {  # name, ssd_impl, XLA_FLAGS, extra args
  XLA_FLAGS="$3" timeout 185 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=131072 \
    --frames_per_step=64 --decode_impls=device_fused_mixed --decode_tokens=256 --decode_repeats=3 \
    --repeats=3 --ssd_impl=$2 $4 --json=$OUT/infer_b_$1.json > $OUT/infer_b_$1.txt 2>&1
  echo "== $1 (ssd $2, XLA_FLAGS '$3')"; grep "decode device_fused_mixed" $OUT/infer_b_$1.txt | cut -c60-; g $OUT/infer_b_$1.txt 3
  python - $OUT/infer_b_$1.json <<'PY'
import json, sys
try: print(json.load(open(sys.argv[1]))["step_parts"])
except Exception as e: print("no json", e)
PY
}
run pallas pallas ""
run pallas_dsf pallas "--xla_gpu_enable_dynamic_slice_fusion=true" "--profile_dir=/tmp/prof"
run auto_dsf auto "--xla_gpu_enable_dynamic_slice_fusion=true"

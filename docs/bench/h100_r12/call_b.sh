# Session 12, call b: GPU tests (the device loop now decodes 4 tokens a while-loop
# iteration), then the 2.7B LM's fused_reduce step: the old path (no prefetch, 1 token an
# iteration) and prefetch settings (rows x rows a program) with 4 tokens an iteration.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -3
run() {  # ROWS PER K
  python docs/bench/h100_r12/prefetch.py decode $1 $2 $3 --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$1_$2_$3 --json=$OUT/decode_b_$1_$2_$3.json 2>&1 \
    | grep -v "^I1\|^W1\|^$" | grep "prefetch\|_kernel\|input_reduce_fusion_2\|span\|MemcpyD2H ->"
}
run 0 4 1
run 0 4 4
run 640 4 4
run 640 1 4
run 960 1 4
run 1280 1 4
run 640 2 4
run 1280 2 4
python - <<'PY'
import glob, json, os
rows = [(json.load(open(p))["rows"][0], p) for p in glob.glob(os.environ["OUT"] + "/decode_b_*.json")]
for row, path in sorted(rows, key=lambda r: -r[0]["tok/s"]):
  print(f"{row['tok/s']:7.1f} tok/s  gpu {row['gpu ms/token']:.3f} ms/token  {path.split('/')[-1]}")
PY

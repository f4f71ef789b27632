# Session 12, call d: (1) where bench.infer's process loses time in decoding
# (infer_gap.py: the same decode at points of bench.infer's setup); (2) the 2.7B LM's
# fused_reduce step with the prefetch programs before the mixer's on the grid (FIRST=1)
# or after, 4 tokens a loop iteration.
# (FIRST=1 ran with an uncommitted patch of kernels/decode/pallas.py, PREFETCH_FIRST: the
# prefetch programs first on the grid; it was slower and was not kept.)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python docs/bench/h100_r12/infer_gap.py 2>&1 | grep -v "^W\|^I1\|^ *$"
run() {  # FIRST ROWS PER
  FIRST=$1 python docs/bench/h100_r12/prefetch.py decode $2 $3 4 --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=5 \
    --profile_dir=/tmp/dprof_$1_$2_$3 --json=$OUT/decode_d_$1_$2_$3.json 2>&1 \
    | grep -v "^I1\|^W1\|^$" | grep "_kernel\|input_reduce_fusion_2\|span"
}
run 0 640 2
run 1 640 2
run 1 960 2
run 0 960 2
run 1 1280 4
run 1 640 1
python - <<'PY'
import glob, json, os
rows = [(json.load(open(p))["rows"][0], p) for p in glob.glob(os.environ["OUT"] + "/decode_d_*.json")]
for row, path in sorted(rows, key=lambda r: -r[0]["tok/s"]):
  print(f"{row['tok/s']:7.1f} tok/s  gpu {row['gpu ms/token']:.3f} ms/token  {path.split('/')[-1]}")
PY

# Session 12, call f: GPU tests (the defaults: prefetch on, 4 tokens a loop iteration, in_proj
# padded to 8 rows); the 2.7B LM's fused_reduce step, session 11's path (no prefetch, 1 token
# an iteration, 256-row padding) rerun beside the new defaults and each change alone;
# infer_fixed.py (the 3.1B model's cost per answer and per token, before and after a prefill).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -2
run() {  # PAD ROWS PER K
  PAD=$1 python docs/bench/h100_r12/prefetch.py decode $2 $3 $4 --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=5 \
    --json=$OUT/decode_f_$1_$2_$3_$4.json 2>&1 | grep "fused_reduce |"
}
run 256 0 2 1
run 8 640 2 4
run 256 640 2 4
run 8 0 2 4
run 256 0 2 1
run 8 640 2 4
timeout 240 python docs/bench/h100_r12/infer_fixed.py 2>&1 | grep -v "^W\|^I1\|^ *$"

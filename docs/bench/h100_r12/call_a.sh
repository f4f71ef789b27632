# Session 12, call a: GPU tests (the mixer's prefetch leaves its outputs unchanged), then the
# 2.7B LM's fused_reduce step with the mixer prefetching 0 / 640 / 1280 / 1920 / 2560 rows
# of out_proj's [2560, 5120] matrix into L2, one process a setting, profiled (timeline).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -4
for rows in 0 640 1280 1920 2560; do
  python docs/bench/h100_r12/prefetch.py decode $rows --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$rows --json=$OUT/decode_a_$rows.json 2>&1 \
    | grep -v "^I1\|^W1\|^$"
done

# Session 11, call a: GPU decode tests after session 10's refactor; XLA's multiply-reduce
# GEMVs (bench.gemv xla_mulsum rows) against the Pallas GEMVs, alone and inside the step.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -4
python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=defaults --profile_dir=/tmp/gprof \
  --json=$OUT/gemv_a.json 2>&1 | grep -v "^\[" | grep -v "^ *$"
for v in pallas reduce_in reduce_out reduce_both; do
  python docs/bench/h100_r11/decode_reduce.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_gemv --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$v --json=$OUT/decode_$v.json 2>&1 | grep -v "^W\|^I0\|^ *$"
done

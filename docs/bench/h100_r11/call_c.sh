# Session 11, call c: after the mixer loads its raw in_proj values before the scale's sum
# and updates the conv stack in place (the previous layer's B/C taps written by the next
# kernel): GPU decode tests, then fused_gemv / fused_reduce against the unrolled step.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -4
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused_gemv,fused_reduce --loops=device --count_kernels= --repeats=3 \
  --profile_dir=/tmp/dprof --json=$OUT/decode_c.json 2>&1 | grep -v "^W\|^I1\|^ *$"
python -m ma2mba_jax.bench.gemv --preset=2.7b --sweep=defaults --rows=1 --profile_dir=/tmp/gprof \
  --json=$OUT/gemv_c.json 2>&1 | grep -v "^\[" | grep -v "^ *$" | grep "xla\|rows=1:"

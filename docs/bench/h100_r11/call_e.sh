# Session 11, call e: fused_reduce with the sum of squares in in_proj's padding column (the
# mixer reads one value, no partial sums), fused_mixed now fused_reduce for one row; GPU
# decode tests; the 2.7B LM and the 3.1B model with the old path rerun in the same call.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -4
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused_gemv,fused_reduce,fused_mixed --loops=device --count_kernels= \
  --repeats=3 --profile_dir=/tmp/dprof --json=$OUT/decode_e.json 2>&1 \
  | grep -v "^W\|^I1\|^ *$" | grep -v "loop_\|Memcpy\|memcpy"
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_e.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]"

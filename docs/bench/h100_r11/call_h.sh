# Session 11, call h (final tree): GPU decode tests; the 2.7B LM and the 3.1B model with the
# old path rerun in the same call; the 3.1B answers profiled after the timed ones (GPU time
# per token against wall time).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -3
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused_gemv,fused_reduce,fused_mixed --loops=device --count_kernels= \
  --repeats=3 --json=$OUT/decode_h.json 2>&1 | grep -v "^W\|^I1\|^ *$"
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --profile_dir=/tmp/iprof --json=$OUT/infer_h.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]" | grep -v "^ .*us .*%" 

# Session 11, call b: the fused_reduce step (in_proj as XLA's multiply-and-reduce,
# out_proj_then_norm, the mixer's 1/rms from partial sums) against fused_gemv, 2.7B LM and
# the 3.1B model (with its decode profile: where the 3.1B's extra ~0.12 ms a token goes).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=unrolled,fused_gemv,fused_reduce --loops=device --count_kernels= --repeats=3 \
  --profile_dir=/tmp/dprof --json=$OUT/decode_b.json 2>&1 | grep -v "^W\|^I1\|^ *$"
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_reduce --decode_tokens=256 \
  --repeats=3 --profile_dir=/tmp/iprof --json=$OUT/infer_b.json 2>&1 \
  | grep -v "^W\|^I1\|^ *$" | grep -v "encoder\|layers" 

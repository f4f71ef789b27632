# Session 12, call h (final tree): infer_fixed.py (the loop state now donated to each loop
# dispatch), then the acceptance run as in session 11's call h: the 3.1B model after a
# 16K-token video, 256 greedy tokens, the old paths (unrolled; fused_gemv, session 10's
# default) rerun beside fused_mixed (the GPU default), median of 3 answers, profiled.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python docs/bench/h100_r12/infer_fixed.py 2>&1 | grep -v "^W\|^I1\|^ *$"
timeout 360 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --profile_dir=/tmp/iprof --json=$OUT/infer_h.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]" | grep -v "^  .*us .*%.*x"

# Session 12, call k (final tree): GPU tests; dispatch.py (an answer's host costs, 2.7B LM);
# the acceptance run as call h (bench.infer, 3.1B after a 16K-token video, 256 tokens, old
# paths rerun). Since call j: knobs, stop ids and the block end go to the jitted calls as
# numpy scalars, sampling keys are made once per seed, the weights go as a flat list, and
# generate no longer reshapes the logits eagerly.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -2
python docs/bench/h100_r12/dispatch.py 2>&1 | grep -v "^W\|^I1\|^ *$"
timeout 300 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_k.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]" | grep -v "^  .*us .*%.*x"

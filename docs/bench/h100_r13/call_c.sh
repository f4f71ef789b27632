# Session 13, call c: Sampler(reuse_buffers=True), the new default: each answer's `start`
# writes its DecodeState into the last answer's buffers (donated), so every answer's loop
# runs on the same device buffers. Expected: the ~3% slower decoding after a prefill (calls
# a, b: any large XLA computation, undone only by jax.clear_caches) and part of an answer's
# fixed cost go away if they come from XLA updating the loop's CUDA graphs to new buffer
# addresses. after_prefill.py times both samplers; then the acceptance run as session 12's
# call k (bench.infer, 3.1B after a 16K-token video, 256 tokens, old paths rerun).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
F='^W\|^I1\|^ *$'
BOTH=1 ORDER=ssd_xla,full timeout 250 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F"
timeout 320 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_c.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]"

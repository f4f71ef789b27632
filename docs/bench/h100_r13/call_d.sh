# Session 13, call d: out_proj_folded's L2 prefetch of the next layer's in_proj (extra
# programs after the output's read its first rows with evict_last while out_proj streams its
# own matrix below the card's bandwidth). Expected: XLA's in_proj reduction (20.8 us a
# layer, 2.6 TB/s) finds those rows in L2: up to ~2-3 us a layer less if out_proj's own
# time does not grow by as much. The GPU prefetch and fused-step tests (provisional default
# 1024 rows); a sweep of 0, 1024, 2048 rows and 0 again (3.1B, zero states); the
# acceptance run (bench.infer as call c) with the fastest count.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu timeout 120 python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py -k "prefetch or reduce" 2>&1 | tail -2
timeout 260 python docs/bench/h100_r13/out_prefetch.py sweep 0 1024 2048 0 2>&1 | grep -v "^W\|^I1\|^ *$"
timeout 200 python docs/bench/h100_r13/out_prefetch.py infer $(cat $OUT/best.txt) --preset=3.1b \
  --lengths=16384 --frames_per_step=64 --decode_impls=device,device_fused_gemv,device_fused_mixed \
  --decode_tokens=256 --decode_repeats=3 --repeats=3 --json=$OUT/infer_d.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]"

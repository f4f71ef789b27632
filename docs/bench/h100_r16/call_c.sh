# Session 16, call c: (1) where the 3.1B prefill with the Pallas SSD loses time beside its
# steps' GPU work (prefill_trace.py); (2) the Pallas SSD's forward kernels against
# jax-triton's at the prefill step's length (T = 9,216 = 64 frames x 144), with block,
# warp and pipelining variants (bench.ssd --breakdown, each kernel alone).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
SSD=pallas timeout 200 python docs/bench/h100_r16/prefill_trace.py > $OUT/prefill_trace_c.txt 2>&1
grep -v "^W\|^I1\|^ *$" $OUT/prefill_trace_c.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | head -60
specs=triton,pallas,pallas:warps_state=4,pallas:block_p=32,pallas:block_p=32:warps_state=4
specs=$specs,pallas:num_stages=1,pallas:num_stages=3,pallas:num_stages=4
specs=$specs,pallas:warps_chunk=8,pallas:block_l=128:warps_chunk=8,pallas:block_l=128:warps_chunk=4
specs=$specs,pallas:block_l=32,pallas:block_l=32:warps_chunk=2,pallas:block_s=512,pallas:block_s=2048
specs=$specs,pallas:warps_pass=8,pallas:warps_pass=2,triton:num_stages=3
timeout 240 python -m ma2mba_jax.bench.ssd --breakdown --impl=$specs --lengths=9216 --heads=80 \
  --kernels=chunk_state,state_pass,chunk_scan_fwd --json=$OUT/ssd_sweep_c.json > $OUT/ssd_sweep_c.txt 2>&1
grep "^{" $OUT/ssd_sweep_c.txt | grep -v reverse | sed "s/'H': 80, 'T': 9216, //"

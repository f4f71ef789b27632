# Session 11, call f: fused_reduce's out_proj folded (gemv.out_proj_folded: yw in bf16, the
# gated norm's 1/rms after the matmul) against out_proj_then_norm (call e's); GPU tests.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
JAX_PLATFORMS=cuda,cpu python -m pytest -p no:xdist -q -m gpu tests/gpu/test_decode_gpu.py 2>&1 | tail -3
for v in nofold fold; do
  python docs/bench/h100_r11/decode_fold.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$v --json=$OUT/decode_f_$v.json 2>&1 \
    | grep -v "^W\|^I1\|^ *$" | grep -v "loop_\|Memcpy\|memcpy"
done
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_mixed --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_f.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]"

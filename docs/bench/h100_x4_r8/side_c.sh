# Call c's benches on GPU 3, one after another: OUT_DIR. Each has its own timeout.
set -u
out=$1
export CUDA_VISIBLE_DEVICES=3 XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
echo "== 2.7B, no remat, 16K, fused block ($(date -u +%T))"
timeout 100 python -m ma2mba_jax.bench.remat --model=2.7b --lengths=16384 --policies=none \
    --block_impl=fused --repeats=3 --timeout=95 --json=$out/remat_none16k.json 2>&1 | grep -v -i warn | tail -6
echo "== 2.7B, MA-GC auto, 2^19, no offload, 42.2 GB budget ($(date -u +%T))"
timeout 270 python -m ma2mba_jax.bench.remat --model=2.7b --policies=magc --lengths=524288 \
    --planner=measure --budget_gb=42.2 --l=auto --s=auto --cell_saves=auto --offload=none \
    --max_candidates=12 --repeats=3 --timeout=265 --json=$out/remat_magc_2p19_auto.json 2>&1 | grep -v -i warn | tail -12
unset XLA_PYTHON_CLIENT_MEM_FRACTION
for setting in default no_triton_gemm; do
  echo "== decode 2.7B LM, XLA $setting ($(date -u +%T))"
  flags=""; [ $setting = no_triton_gemm ] && flags="--xla_gpu_enable_triton_gemm=false"
  XLA_FLAGS="$flags" timeout 75 python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
      --step_impls=unrolled,fused --loops=device --count_kernels= --repeats=3 --label=$setting \
      --json=$out/decode_$setting.json 2>&1 | grep -v -i warn | tail -6
done
echo "== side done ($(date -u +%T))"

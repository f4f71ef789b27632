# README figures on a one-GPU machine, one after another: OUT_DIR.
set -u
out=$1; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpus.txt
echo "== 2.7B, MA-GC auto, 2^19, no offload, 42.2 GB budget ($(date -u +%T))"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 250 python -m ma2mba_jax.bench.remat --model=2.7b --policies=magc --lengths=524288 \
    --planner=measure --budget_gb=42.2 --l=auto --s=auto --cell_saves=auto --offload=none \
    --max_candidates=12 --repeats=3 --timeout=245 --json=$out/remat_magc_2p19_auto.json 2>&1 | grep -v -i warn | tail -4
echo "== decode 2.7B LM ($(date -u +%T))"
timeout 60 python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
    --step_impls=unrolled,fused --loops=device --count_kernels= --repeats=3 \
    --json=$out/decode_default.json 2>&1 | grep -v -i warn | tail -4
echo "== packing, 370M, bf16 ($(date -u +%T))"
OUT=$out/packing COMPUTE_DTYPE=bfloat16 EXAMPLES=128 BENCH_TIMEOUT=190 BUCKET_MULTIPLE=1024 \
    BUCKET_RATIO=1.41 PACK_WINDOW=16 MODES=padded,packing PART2=0 PY=python bash scripts/bench_packing.sh
echo "== done ($(date -u +%T))"

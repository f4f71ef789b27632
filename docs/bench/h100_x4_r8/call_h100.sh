# One call on a one-GPU machine (run from the tree's root): DEADLINE_S for the trainer.
# First the 2.7B no-remat 16K step (bench.remat), then the 3.1B stage-2 defaults through the
# trainer (drive.py, stopped after step 4), memory fraction 0.95 as launch/single_gpu.sh.
set -u
deadline=$1
mkdir -p $OUT/e
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee $OUT/e/gpus.txt
echo "tree $(cat TREE 2>/dev/null || echo unknown)" | tee -a $OUT/e/gpus.txt
export MEM_FRACTION=0.95
echo "== 2.7B, no remat, 16K, fused block ($(date -u +%T))"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 80 python -m ma2mba_jax.bench.remat --model=2.7b \
    --lengths=16384 --policies=none --block_impl=fused --repeats=3 --timeout=75 \
    --json=$OUT/e/remat_none16k.json 2>&1 | grep -v -i warn | tail -4
python -m ma2mba_jax.data.synthetic --out /tmp/d19 --size long --frame-size 64 --video-fps 1 \
    --images 2 --clips 2 --walks 4 --qa-videos 1 --qa-val-videos 1 --eval-videos 1 | tail -1
python docs/bench/h100_x4_r8/make_spec.py e $deadline $OUT/e/spec.json
python docs/bench/issue16_h100/drive.py $OUT/e/spec.json $OUT/e 2>&1 | tee $OUT/e/drive.txt

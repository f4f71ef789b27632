# One device call on 4 GPUs of one host (run from the tree's root): c DEADLINE_S.
#   c: GPU 0 the 3.1B stage-2 defaults on one GPU; GPUs 1,2 the same with ZeRO-1 on 2 GPUs;
#      GPU 3 the 2.7B benches of side_c.sh (16K no remat, 2^19 auto, decode with two XLA settings)
# The trainer runs go through docs/bench/issue16_h100/drive.py (each stopped after step 4);
# logs, specs and summaries land under $OUT/PHASE.
set -u
phase=$1; deadline=$2
mkdir -p $OUT/$phase
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee $OUT/$phase/gpus.txt
echo "tree $(cat TREE 2>/dev/null || echo unknown)" | tee -a $OUT/$phase/gpus.txt
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | tail -1)
export MEM_FRACTION=$(python -c "print(round(min(0.95, 0.95 * 81559 / $total), 3))")
echo "memory fraction $MEM_FRACTION of $total MiB per card (launch/*.sh's 0.95 of an 80 GB H100)"
bash docs/bench/h100_x4_r8/side_$phase.sh $OUT/$phase > $OUT/$phase/side.txt 2>&1 &
side=$!
python -m ma2mba_jax.data.synthetic --out /tmp/d19 --size long --frame-size 64 --video-fps 1 \
    --images 2 --clips 2 --walks 4 --qa-videos 1 --qa-val-videos 1 --eval-videos 1 | tail -1
python docs/bench/h100_x4_r8/make_spec.py $phase $deadline $OUT/$phase/spec.json
python docs/bench/issue16_h100/drive.py $OUT/$phase/spec.json $OUT/$phase 2>&1 | tee $OUT/$phase/drive.txt
wait $side
tail -40 $OUT/$phase/side.txt

# One device call of issue 16 (run from the tree's root): PHASE (a|b) DEADLINE_S; logs and
# the summary under $OUT.
set -u
phase=$1; deadline=$2
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee $OUT/gpus_$phase.txt
git_tree=$(cat TREE 2>/dev/null || echo unknown); echo "tree $git_tree" | tee -a $OUT/gpus_$phase.txt
python -m ma2mba_jax.data.synthetic --out /tmp/d19 --size long --frame-size 64 --video-fps 1 \
    --images 2 --clips 2 --walks 4 --qa-videos 1 --qa-val-videos 1 --eval-videos 1 | tail -1
python docs/bench/issue16_h100/gen_long_walks.py 7600 --out /tmp/d20 --size long --frame-size 64 \
    --video-fps 1 --images 2 --clips 2 --walks 2 --qa-videos 1 --qa-val-videos 1 --eval-videos 1 | tail -1
python docs/bench/issue16_h100/make_spec.py $phase $deadline $OUT/spec_$phase.json
python docs/bench/issue16_h100/drive.py $OUT/spec_$phase.json $OUT/$phase 2>&1 | tee $OUT/drive_$phase.txt

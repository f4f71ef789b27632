# For the next session (written in session 16; smoke-run on CPU only): what issue 19 asks
# beside the 131K run, with the Pallas SSD now inference's default on a GPU: (1) memory flat
# in video length up to 2M tokens (last run in session 9), (2) evaluation throughput with the
# 3.1B model against the old path (decode_batch; last run in session 9, 3.6-3.7x). ~400 s.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
g() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -${2:-3}; }
timeout 220 python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384,2097152 --frames_per_step=64 \
  --decode_impls=device_fused_mixed --decode_tokens=64 --repeats=3 --json=$OUT/infer_2m.json \
  > $OUT/infer_2m.txt 2>&1; g $OUT/infer_2m.txt 4
timeout 300 python -m ma2mba_jax.bench.eval_throughput --model_preset=3.1b --dtype=bfloat16 \
  --param_dtype=bfloat16 --synthetic_dir=/tmp/synth --eval_videos=1 --step_frames=16 \
  --timed_runs=2 --ways=decode_batch,all_batched --json_out=$OUT/eval_3.1b.json > $OUT/eval_3.1b.txt 2>&1
g $OUT/eval_3.1b.txt 6

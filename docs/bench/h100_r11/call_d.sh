# Session 11, call d: fused_reduce with 1 / 16 / 64 copies of the partial sums of squares
# (2.7B LM, profiled: the mixer kernel's time), then the 3.1B model end to end, three
# answers per step (the median; each answer's rate logged).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for c in 1 16 64; do
  python docs/bench/h100_r11/decode_copies.py $c --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$c --json=$OUT/decode_d_copies$c.json 2>&1 \
    | grep -v "^W\|^I1\|^ *$" | grep -v "loop_\|Memcpy\|memcpy"
done
python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 --frames_per_step=64 \
  --decode_impls=device,device_fused_gemv,device_fused_reduce --decode_tokens=256 \
  --decode_repeats=3 --repeats=3 --json=$OUT/infer_d.json 2>&1 \
  | grep -v "^W\|^ *$" | grep -v "^I1.*\] [^d]" 

# Session 12, call c: the 3.1B model (bench.infer, 16K-token video, fused_mixed) with the
# old path (no prefetch, 1 token a loop iteration) and call b's fastest setting (argument:
# ROWS PER K), each profiled (the GPU timeline: idle between kernels).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
best="$*"
for setting in "0 4 1" "$best"; do
  python docs/bench/h100_r12/prefetch.py infer $setting --preset=3.1b --lengths=16384 \
    --frames_per_step=64 --decode_impls=device_fused_mixed --decode_tokens=256 \
    --decode_repeats=5 --repeats=1 --profile_dir=/tmp/iprof_${setting// /_} \
    --json=$OUT/infer_c_${setting// /_}.json 2>&1 \
    | grep "prefetch\|decode device\|span\|gaps\|->\|^scan \|^loop"
done

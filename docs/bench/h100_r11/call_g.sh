# Session 11, call g: launch settings of out_proj_folded and the mixer kernel inside the
# fused_reduce step (2.7B LM, profiled), one process a variant.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for v in current out_bn8 out_bk512 out_bn2_w2 out_noahead out_w8_bk2048 mixer_s8w2 mixer_s8w1 mixer_s2w4; do
  python docs/bench/h100_r11/decode_variants.py $v --preset=2.7b --tokens=256 \
    --step_impls=fused_reduce --loops=device --count_kernels= --repeats=3 \
    --profile_dir=/tmp/dprof_$v --json=$OUT/decode_g_$v.json 2>&1 \
    | grep "_kernel\|fusion_2 \| fused_reduce \|GPU busy\|Config"
done

# Session 11, call i (diagnostic): is the ~0.08 ms a token that the GPU waits in bench.infer's
# decode loop the while loop's host round trip? The same runs with XLA's command buffers
# over the loop (WHILE, CONDITIONAL: a CUDA graph, the condition on the device), the default
# rerun in the same call.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CB=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
XLA_FLAGS=$CB python -m ma2mba_jax.bench.decode --preset=2.7b --tokens=256 \
  --step_impls=fused_mixed --loops=device --count_kernels= --repeats=3 --label=cmdbuf \
  --json=$OUT/decode_i_cmdbuf.json 2>&1 | grep "fused_mixed \|Error"
for flags in "" "$CB"; do
  XLA_FLAGS=$flags python -m ma2mba_jax.bench.infer --preset=3.1b --lengths=16384 \
    --frames_per_step=64 --decode_impls=device_fused_mixed --decode_tokens=256 \
    --decode_repeats=3 --repeats=1 --json=$OUT/infer_i${flags:+_cmdbuf}.json 2>&1 \
    | grep "infer.py.*decode\|^scan |\|Error"
done

# Session 12, call e: infer_gap.py (decode speed at points of bench.infer's setup, with the
# GPU's clocks) under XLA's default flags, with command buffers off, and with command
# buffers over while loops and conditionals (the whole decode loop a CUDA graph).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for flags in "" "--xla_gpu_enable_command_buffer=" \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
  echo "XLA_FLAGS=$flags"
  XLA_FLAGS=$flags timeout 190 python docs/bench/h100_r12/infer_gap.py 2>&1 | grep -v "^W\|^I1\|^ *$"
done

# Session 12, call g: infer_fixed.py with 4 and 16 tokens a loop iteration (the 3.1B model's
# cost per answer and per token, before and after a prefill, and the parts of an answer).
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for k in 4 16; do
  K=$k timeout 280 python docs/bench/h100_r12/infer_fixed.py 2>&1 | grep -v "^W\|^I1\|^ *$"
done

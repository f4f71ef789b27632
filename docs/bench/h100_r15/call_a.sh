# Session 15, call a: is the decode slowdown after an LM computation (sessions 13-14) undone
# by resetting persisting L2 lines or by flushing the L2; is it caused by XLA's autotuning
# (the LM compiled with --xla_gpu_autotune_level=0, the whole process); does the LM with the
# Pallas SSD trigger it; and where an answer's time goes besides its tokens (host trace).
# Expected (written before the call): if sticky evict_last/persisting L2 lines left by the
# LM are the cause, l2reset brings the marginal ms/token back to the "before" value
# (~2.39-2.40); flush cannot (normal reads do not evict evict_last lines first).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
ORDER=lm,l2reset,flush timeout 140 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_a_reset.txt 2>&1; f $OUT/limits_a_reset.txt 7
XLA_FLAGS=--xla_gpu_autotune_level=0 ORDER=lm timeout 110 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_a_noautotune.txt 2>&1; f $OUT/limits_a_noautotune.txt 3
ORDER=lmssd_pallas timeout 110 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_a_lmssd_pallas.txt 2>&1; f $OUT/limits_a_lmssd_pallas.txt 3
STAGE=lm timeout 150 python docs/bench/h100_r15/answer_trace.py > $OUT/trace_a.txt 2>&1; grep -v "^W\|^I1\|^ *$" $OUT/trace_a.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | grep "tok/s\|GPU\|gaps\|===" 

# Session 14, call h: the SSD forward alone as the trigger (session 13: impl="xla" at 9,216
# tokens slowed the decode): plain XLA at 1,024 tokens (does it depend on size?), and the
# project's Pallas kernels alone at 9,216 tokens (session 13 ran them only after the XLA
# one). One process a stage.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token\|^limits" | tail -${2:-4}; }
for stage in ssd_xla_1024 ssd_pallas_9216; do
  ORDER=$stage timeout 120 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_h_$stage.txt 2>&1; f $OUT/limits_h_$stage.txt
done

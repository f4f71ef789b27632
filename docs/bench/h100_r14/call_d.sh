# Session 14, call d: the decode loop profiled with in_proj as XLA's reduction and as
# gemv.in_proj_stream under four launch settings (loop_profile.py), to see which kernels
# grow in the loop (call c: the kernel alone 22.1 us against XLA's 23.0, the loop 2.61 ms a
# token against 2.39).
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
timeout 400 python docs/bench/h100_r14/loop_profile.py > $OUT/loop_d.txt 2>&1; grep -v "^W\|^I1\|^ *$" $OUT/loop_d.txt | grep -v "^E1\|cuda_\|Source Loc\|external/" | tail -120

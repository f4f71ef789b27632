# Session 14, call e: the decode slowdown after an LM computation against the allocator.
# (1) default settings: a 20 GiB make-and-free, then 200 small executables, then the LM
# layers (the known slowdown, for reference); (2) the BFC allocator growing on demand
# (XLA_PYTHON_CLIENT_PREALLOCATE=false): the LM layers, then the 20 GiB; (3) no BFC at all
# (XLA_PYTHON_CLIENT_ALLOCATOR=platform: cudaMalloc / cudaFree per buffer): the LM layers.
# Expected if the BFC's layout after a large computation is the cause (the loop's temp
# buffers placed elsewhere): alloc slows the decode like lm in (1), (3) shows no slowdown.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
f() { grep -v "^W\|^I1\|^ *$" $1 | grep -v "^E1\|cuda_\|Source Loc\|external/\|first 4-token" | tail -${2:-12}; }
ORDER=alloc,tiny,lm timeout 200 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_e1.txt 2>&1; f $OUT/limits_e1.txt
XLA_PYTHON_CLIENT_PREALLOCATE=false ORDER=lm,alloc timeout 170 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_e2.txt 2>&1; f $OUT/limits_e2.txt
XLA_PYTHON_CLIENT_ALLOCATOR=platform ORDER=lm timeout 150 python docs/bench/h100_r14/ctx_limits.py > $OUT/limits_e3.txt 2>&1; f $OUT/limits_e3.txt

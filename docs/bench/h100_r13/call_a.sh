# Session 13, call a: after_prefill.py. Which stage (vision encoder alone, LM layers alone,
# the Streamer's whole video, clearing every executable) slows the decoding afterwards, with
# and without command buffers in the prefill's executables, and which kernels slow down.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
F='^W\|^I1\|^ *$'
ORDER=enc,lm,full,clear timeout 220 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F"
NOGRAPH=1 ORDER=full,clear timeout 160 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F"
PROFILE=1 ORDER=full timeout 180 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F" | grep -v "^  .*us .*%.*x"

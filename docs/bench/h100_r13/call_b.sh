# Session 13, call b: after_prefill.py. Call a found that the LM layers' prefill alone slows
# the decoding after it (the encoder does not), with or without command buffers, and that
# jax.clear_caches() undoes it. Which SSD backend's kernels do it (XLA, Pallas, jax-triton:
# the GPU default), and is it the prefill's executable (dropped alone) or the decode loop's
# (a new Sampler)?
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
F='^W\|^I1\|^ *$'
ORDER=ssd_xla,ssd_pallas,ssd_triton timeout 200 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F"
ORDER=lm,droplm,newsampler timeout 200 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v "$F"

# Session 13, call e: does the decode slow down when a large LM executable is only compiled
# (never run), and does it recover when every other executable and JAX's Python-level caches
# are dropped while the decode loops' executables are kept (no recompile)?
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ORDER=lmcompile,dropall timeout 230 python docs/bench/h100_r13/after_prefill.py 2>&1 | grep -v '^W\|^I1\|^ *$'

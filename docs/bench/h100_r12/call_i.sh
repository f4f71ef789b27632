# Session 12, call i: python docs/bench/h100_r12/dispatch.py (2.7B LM, H100)

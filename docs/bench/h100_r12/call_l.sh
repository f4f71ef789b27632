# Session 12, call l: python docs/bench/h100_r12/infer_nograph.py (3.1B, H100)

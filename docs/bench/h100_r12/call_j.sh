# Session 12, call j: python docs/bench/h100_r12/generate_profile.py (2.7B LM, H100)

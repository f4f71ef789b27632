# Session 16, call a: session 15's next_call.sh as written (does the unrolled layer loop
# with the jax-triton SSD leave the decode as fast?).
bash docs/bench/h100_r15/next_call.sh

# For the next session (written in session 16 after its device time was spent): call e's
# acceptance run again, now that bench.infer makes its random frames before the prefill's
# clock starts (bench/frames.frame_pool; until then each timed prefill also made 4 x 64
# random 336x336 frames on the host, 0.4-0.6 s on a 2-core CPU, while the GPU idled): the
# default (Pallas SSD on a GPU, tuned), then jax-triton's SSD and the old unrolled decode
# loop (device) in the same call; one process each, ~300 s. Smoke-run on CPU (tiny preset).
bash docs/bench/h100_r16/call_e.sh

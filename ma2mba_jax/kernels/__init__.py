"""Compute kernels. They know nothing of models or training."""

# Pallas registers a config option that is part of JAX's trace context
# ("pallas_fuser_disable_nested_fuse") only when its fuser module is first imported, which
# a pallas_call does lazily on its first call. That changes the trace context, so every
# function jitted before the first Pallas kernel ran would be traced and compiled again on
# its next call (after the first answer of a Sampler with Pallas decode kernels, the 3.1B
# model's frame step and every decode loop: seconds each; tests/kernels/
# test_trace_context.py). Importing it here, before anything is jitted, keeps the
# context fixed.
import jax.experimental.pallas.fuser  # noqa: F401

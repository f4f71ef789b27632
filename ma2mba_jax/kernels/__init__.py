"""Compute kernels. They know nothing of models or training."""

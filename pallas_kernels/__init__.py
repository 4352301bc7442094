"""Pallas kernels (Triton backend on GPU), each with a pure-jnp reference beside it."""

"""Forty-first session: the allocator's largest free block after a preset's weights are made
(llama-2-7b, bf16, on the GPU), fused on the device afterwards ("after") or made fused in one
executable ("one_jit", jaxlora.model.init_params(fuse_groups=1), the new default).
Run once per mode in a fresh process: python3 fragmentation.py after|one_jit"""

import sys

import jax
import jax.numpy as jnp

from configs.models import MODEL_PRESETS
from jaxlora.model import fuse_projections, init_params

mode = sys.argv[1]
config = MODEL_PRESETS["llama-2-7b"]
if mode == "after":
    params = fuse_projections(init_params(config, 0, jnp.bfloat16), groups=1)
else:
    params = init_params(config, 0, jnp.bfloat16, fuse_groups=1)
jax.block_until_ready(params)
stats = jax.devices()[0].memory_stats()
gib = 2**30
free = stats["bytes_limit"] - stats["bytes_in_use"]
largest = stats["largest_free_block_bytes"]
print(
    f"{mode}: in use {stats['bytes_in_use'] / gib:.2f} GiB, peak "
    f"{stats['peak_bytes_in_use'] / gib:.2f}, free {free / gib:.2f}, largest free block "
    f"{largest / gib:.2f} (hole {(free - largest) / gib:.2f})"
)

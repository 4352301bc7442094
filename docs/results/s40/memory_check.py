"""Fortieth session: --gpu_memory_utilization on the GPU (run with PYTHONPATH=.).

Builds the server's state for the llama-2-7b preset (random bf16 weights) at the share given,
runs a batch of requests over 16 adapters (prompts of 256 tokens, 64 out), and prints the KV
pages it was given, JAX's memory report before and after (bytes_limit, bytes_in_use, the
peak) and the working memory the steps actually took beside the estimate.
"""

import json
import logging
import sys
import time

import jax
import numpy as np

from jaxlora.lora import random_lora_weights
from jaxlora.sampling import SamplingParams
from jaxlora.server.device_memory import step_working_bytes
from jaxlora.server.launch import LaunchConfig, build_state

logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
utilization = float(sys.argv[1])
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
model = sys.argv[3] if len(sys.argv) > 3 else "llama-2-7b"
launch = LaunchConfig(
    model=model, dtype="bfloat16", gpu_memory_utilization=utilization, max_batch=batch
)
t0 = time.perf_counter()
state = build_state(launch)
llm = state.llm
device = jax.devices()[0]
built = device.memory_stats() or {}  # (none on the CPU)
ec = llm.engine.engine_config
tokens = ec.kv.num_pages * ec.kv.page_size
print(f"built in {time.perf_counter() - t0:.1f} s; KV pages {ec.kv.num_pages} ({tokens} tokens)")
for i in range(16):
    llm.register_adapter(
        f"a{i}", random_lora_weights(llm.config, f"a{i}", 16, seed=i, std=0.01, dtype=np.float32)
    )
runner = llm.engine.runner
step = runner._step
probed = []


def probe(*args, **kwargs):
    """The first steps run one at a time: were the K/V pools donated, and how far did the
    allocator's peak move (a copy of a pool shows as a pool's bytes)?"""
    if len(probed) >= 6:
        return step(*args, **kwargs)
    before = device.memory_stats() or {}
    result = step(*args, **kwargs)
    jax.block_until_ready(result)
    after = device.memory_stats() or {}
    donated = [x.is_deleted() for x in jax.tree.leaves(args[1:3])]
    key = (kwargs.get("mode"), kwargs.get("use_lora"), kwargs.get("per_token"))
    probed.append(key)
    print(
        f"step {key}: pools donated {donated}; peak {before.get('peak_bytes_in_use', 0):,} -> "
        f"{after.get('peak_bytes_in_use', 0):,}; in use {before.get('bytes_in_use', 0):,} -> "
        f"{after.get('bytes_in_use', 0):,}",
        flush=True,
    )
    return result


if len(sys.argv) > 4:
    runner._step = probe
    jax.config.update("jax_transfer_guard_device_to_device", "log")
rng = np.random.default_rng(0)
prompts = [rng.integers(3, llm.config.vocab_size, 256).tolist() for _ in range(batch)]
sampling = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
t1 = time.perf_counter()
out = llm.generate(prompts, adapter=[f"a{i % 16}" for i in range(batch)], sampling=sampling)
after = device.memory_stats() or {}
elapsed = time.perf_counter() - t1
print(f"generated {len(out)} x {len(out[0].token_ids)} tokens in {elapsed:.1f} s")
working = step_working_bytes(llm.config, max_num_tokens=ec.max_num_tokens, max_batch=batch)
peak_over_built = after.get("peak_bytes_in_use", 0) - built.get("bytes_in_use", 0)
summary = {
    "utilization": utilization,
    "kv_pages": ec.kv.num_pages,
    "bytes_limit": after.get("bytes_limit"),
    "in_use_built": built.get("bytes_in_use"),
    "in_use_after": after.get("bytes_in_use"),
    "peak": after.get("peak_bytes_in_use"),
    "peak_over_built": peak_over_built,
    "working_estimate": working,
    "peak_share_of_limit": after.get("peak_bytes_in_use", 0) / after.get("bytes_limit", 1),
}
print(json.dumps(summary, indent=1))
llm.stop()

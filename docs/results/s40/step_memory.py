"""Fortieth session: each compiled step's memory (XLA's memory analysis) beside its K/V pools.

On the H100 the first step at --gpu_memory_utilization=0.9 on llama-2-7b failed to allocate
25.87 GiB, one K/V pool's size. This runs prefill and decode steps with and without an adapter
(the tiny model with argv[1] KV pages; or argv[3], a preset through the server's launch path,
at batch argv[4]) and prints each step's argument, temporary and aliased bytes (a temporary
near a pool's size would be a copy of it), whether the pools were donated, and the allocator's
peak. The compiled HLO of every step goes to argv[2] when given. The answer (BENCHMARKS,
"Device memory at start-up"): no step copies a pool; the pools' own allocation had failed.
"""

import os
import sys

import jax
import jax.numpy as jnp

from configs.models import TINY
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.llm import LLM
from jaxlora.lora import random_lora_weights
from jaxlora.sampling import SamplingParams

num_pages = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
out_dir = sys.argv[2] if len(sys.argv) > 2 else None
dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
config = EngineConfig(
    kv=KVCacheConfig(num_pages=num_pages, page_size=16, max_model_len=256),
    runner=RunnerConfig(max_batch=4),
    max_num_tokens=128,
)
if len(sys.argv) > 3:  # a preset through the server's launch path: model, max_batch
    from jaxlora.server.launch import LaunchConfig, build_state

    launch = LaunchConfig(
        model=sys.argv[3], dtype="bfloat16", max_batch=int(sys.argv[4]), kv_pages=num_pages
    )
    llm = build_state(launch).llm
else:
    llm = LLM(TINY, engine_config=config, dtype=dtype)
llm.register_adapter("a", random_lora_weights(llm.config, "a", 8, std=0.01))
runner = llm.engine.runner
step = runner._step
seen = set()


def probe(*args, **kwargs):
    key = (kwargs.get("mode"), kwargs.get("use_lora"), kwargs.get("per_token"))
    if key not in seen:
        seen.add(key)
        compiled = step.lower(*args, **kwargs).compile()
        m = compiled.memory_analysis()
        pools = sum(x.nbytes for x in jax.tree.leaves(args[1:3]))
        print(
            f"{key}: arguments {m.argument_size_in_bytes:,} temporaries "
            f"{m.temp_size_in_bytes:,} aliased {m.alias_size_in_bytes:,} "
            f"(K/V pools {pools:,}; temporaries / pools {m.temp_size_in_bytes / pools:.3f})",
            flush=True,
        )
        if out_dir:
            name = "_".join(str(k) for k in key)
            with open(os.path.join(out_dir, f"step_{name}.hlo"), "w") as f:
                f.write(compiled.as_text())
    device = jax.devices()[0]
    before = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    result = step(*args, **kwargs)
    jax.block_until_ready(result)
    after = device.memory_stats() or {}
    donated = [x.is_deleted() for x in jax.tree.leaves(args[1:3])]
    key = (kwargs.get("mode"), kwargs.get("use_lora"), kwargs.get("per_token"))
    print(
        f"  ran {key}: pools donated {donated}; peak {before:,} -> "
        f"{after.get('peak_bytes_in_use', 0):,}, in use {after.get('bytes_in_use', 0):,}",
        flush=True,
    )
    return result


runner._step = probe
jax.config.update("jax_transfer_guard_device_to_device", "log")
print("built:", jax.devices()[0].memory_stats(), flush=True)
sampling = SamplingParams(max_tokens=4, ignore_eos=True)
prompts = [[1, 2, 3, 4, 5] * 20, [3, 4, 5] * 7]
if len(sys.argv) > 3:
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(256)] for i in range(4)]
llm.generate(prompts, adapter=["a", None] * (len(prompts) // 2), sampling=sampling)
llm.generate([[1, 2, 3, 4, 5] * 20], adapter=[None], sampling=sampling)
llm.stop()

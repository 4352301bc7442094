"""Fifty-second session: the device memory a long prompt's prefill steps take beyond the engine's
resident arrays, against the server's step estimate (jaxlora.server.device_memory, which now
counts the prefill attention's transients). One engine at the server's GPU prefill defaults
(4 rows of 64-token chunks, prefill_attention ATTENTION) over random bf16 weights of MODEL at
max_model_len 32,768; JAX's allocator statistics after a short warm request and after four
prompts of PROMPT_LEN tokens.

Run: PYTHONPATH=. python3 docs/results/s52/prefill_memory.py MODEL ATTENTION (auto or xla)."""

import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp

import jaxlora
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.llm import load_base_model
from jaxlora.sampling import SamplingParams

# (jaxlora.server's package imports fastapi, which the device lacks)
_spec = importlib.util.spec_from_file_location("device_memory", "jaxlora/server/device_memory.py")
dm = importlib.util.module_from_spec(_spec)
sys.modules["device_memory"] = dm
_spec.loader.exec_module(dm)

ROWS, PROMPT = 4, int(os.environ.get("PROMPT_LEN", "30000"))
MAX_LEN = int(os.environ.get("MAX_LEN", "32768"))
GIB = 2**30


def stats(label):
    s = jax.devices()[0].memory_stats() or {
        "bytes_in_use": 0,
        "peak_bytes_in_use": 0,
        "bytes_limit": 0,
    }
    print(
        f"{label}: in use {s['bytes_in_use'] / GIB:.3f} GiB, peak "
        f"{s['peak_bytes_in_use'] / GIB:.3f} GiB, limit {s['bytes_limit'] / GIB:.3f} GiB",
        flush=True,
    )
    return s


def main():
    model, attention = sys.argv[1], sys.argv[2]
    config, params, _ = load_base_model(model, seed=0, dtype=jnp.bfloat16, fuse_groups=1)
    runner = RunnerConfig(max_prefill_rows=ROWS, prefill_attention=attention)
    engine_config = EngineConfig(
        kv=KVCacheConfig(page_size=16, num_pages=ROWS * (MAX_LEN // 16 + 2), max_model_len=MAX_LEN),
        runner=runner,
        warmup=False,
    )
    llm = jaxlora.LLM(
        config, params=params, engine_config=engine_config, dtype=jnp.bfloat16, load_workers=0
    )
    once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = min(1000, config.vocab_size - 100)
    try:
        llm.generate([[100 + j for j in range(64)]], sampling=once)
        base = stats("after a 64-token request")
        prompts = [[100 + (i * 37 + j) % vocab for j in range(PROMPT)] for i in range(ROWS)]
        start = time.perf_counter()
        llm.generate(prompts, sampling=once)
        print(f"{ROWS} x {PROMPT}-token prompts in {time.perf_counter() - start:.1f} s", flush=True)
        long = stats("after them")
    finally:
        llm.stop()
    attention_bytes = dm.prefill_attention_bytes(
        config,
        rows=ROWS,
        chunk=runner.prefill_chunk,
        max_model_len=MAX_LEN,
        key_block=runner.prefill_key_block,
        itemsize=2,
    )
    working = dm.step_working_bytes(
        config,
        max_num_tokens=engine_config.max_num_tokens,
        max_batch=runner.max_batch,
        prefill_attention=attention_bytes,
    )
    print(
        f"{model} {attention}: peak over the resident arrays "
        f"{(long['peak_bytes_in_use'] - base['bytes_in_use']) / GIB:.3f} GiB (before the long "
        f"prompts {(base['peak_bytes_in_use'] - base['bytes_in_use']) / GIB:.3f}); estimate: "
        f"prefill attention {attention_bytes / GIB:.3f} GiB, step working memory "
        f"{(working - dm.FIXED_WORKING_BYTES) / GIB:.3f} + fixed {dm.FIXED_WORKING_BYTES / GIB:.0f}"
        " GiB",
        flush=True,
    )


if __name__ == "__main__":
    main()

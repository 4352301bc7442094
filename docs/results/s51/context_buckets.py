"""Fifty-first session: a prefill step's page table cut to its context
(RunnerConfig.prefill_context_buckets) and the prefill attention's implementation
(RunnerConfig.prefill_attention), timed in the engine. One set of random bf16 weights (a preset,
created on the device once), then one engine per mode over them: eight prompts of PROMPT tokens
in one prefill step (chunk 256, 8 rows), one token out, timed over 3 passes after a warm one;
the first tokens of every mode printed (they should agree up to bf16 near-ties).

Run: PYTHONPATH=. python3 docs/results/s51/context_buckets.py MODEL MAX_MODEL_LEN MODE...
MODE: <buckets>-<attention>[-noblock], buckets "whole" (none) or keys joined by "_" (e.g.
512_1024_4096), attention xla, cudnn or auto; "-noblock": prefill_key_block None (one pass over
any table); e.g. whole-xla 4096-cudnn 512_1024_2048_4096-cudnn 512_2048_8192-cudnn-noblock.
PROMPT_LEN in the environment sets the prompts' length (default 256)."""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxlora
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.llm import load_base_model
from jaxlora.sampling import SamplingParams

ROWS, PROMPT = 8, int(os.environ.get("PROMPT_LEN", "256"))


def main():
    model, max_model_len, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    print(jax.devices()[0].device_kind, jax.__version__, model, max_model_len, flush=True)
    config, params, _ = load_base_model(model, seed=0, dtype=jnp.bfloat16, fuse_groups=1)
    vocab = min(1000, config.vocab_size - 100)
    prompts = [[100 + (i * 37 + j) % vocab for j in range(PROMPT)] for i in range(ROWS)]
    once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for mode in modes:
        buckets, attention, *block = mode.split("-")
        buckets = () if buckets == "whole" else tuple(int(b) for b in buckets.split("_"))
        engine_config = EngineConfig(
            kv=KVCacheConfig(
                page_size=16,
                num_pages=max(2048, ROWS * (PROMPT // 16 + 2) + 64),
                max_model_len=max_model_len,
            ),
            runner=RunnerConfig(
                max_batch=ROWS,
                prefill_chunk=256,
                max_prefill_rows=ROWS,
                prefill_context_buckets=buckets,
                prefill_attention=attention,
                prefill_key_block=None if block == ["noblock"] else 4096,
            ),
            warmup=False,
        )
        llm = jaxlora.LLM(
            config, params=params, engine_config=engine_config, dtype=jnp.bfloat16, load_workers=0
        )
        try:
            start = time.perf_counter()
            llm.generate(prompts, sampling=once)  # compiles
            warm = time.perf_counter() - start
            times = []
            for _ in range(3):
                start = time.perf_counter()
                outs = llm.generate(prompts, sampling=once)
                times.append(time.perf_counter() - start)
        finally:
            llm.stop()
        passes = ", ".join(f"{t * 1e3:.1f}" for t in times)
        print(
            f"{mode:28s} max_model_len {max_model_len}: {ROWS} x {PROMPT}-token prefills "
            f"median {statistics.median(times) * 1e3:.1f} ms ({passes}; first pass {warm:.1f} s); "
            f"first tokens {[o.token_ids[0] for o in outs]}",
            flush=True,
        )
        del llm


if __name__ == "__main__":
    main()

"""Forty-fifth session (the forty-third session's script): the prefill at a long
max_model_len, blocked (RunnerConfig.prefill_key_block=4096, the default) against one pass over
the whole page table (None). llama-3-8b preset (random bf16 weights), max_model_len 32,768, 8
prompts of 256 tokens, one token out (the time is the prefill's), timed over 3 passes after a
warm one. Run once per mode in a fresh process: python3 long_context_prefill.py blocked|one_pass
[float32] (the forty-sixth session's float32 comparison; bfloat16 without it)."""

import sys
import time

import jax.numpy as jnp

import jaxlora
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.sampling import SamplingParams

mode = sys.argv[1]
dtype = jnp.dtype(sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
config = EngineConfig(
    kv=KVCacheConfig(page_size=16, num_pages=8 * 2048 // 8, max_model_len=32768),
    runner=RunnerConfig(
        max_batch=8,
        prefill_chunk=256,
        max_prefill_rows=8,
        prefill_key_block=4096 if mode == "blocked" else None,
    ),
    warmup=False,
)
llm = jaxlora.LLM("llama-3-8b", engine_config=config, dtype=dtype, load_workers=0)
prompts = [[100 + (i * 37 + j) % 1000 for j in range(256)] for i in range(8)]
once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
llm.generate(prompts, sampling=once)  # compiles
times = []
for _ in range(3):
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling=once)
    times.append(time.perf_counter() - start)
print(
    f"{mode}: 8 x 256-token prefills at max_model_len 32768: {sorted(times)} s; "
    f"first tokens {[o.token_ids[0] for o in outs]}"
)
# The two modes' first tokens differed in one row of eight (call2): each row's two most likely
# first tokens and their logprobs, read as the prompt logprobs of the 257th position.
margin = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=2)
outs = llm.generate([p + [0] for p in prompts], sampling=margin)
for row, out in enumerate(outs):
    top = sorted(out.prompt_top_logprobs[-1].items(), key=lambda kv: -kv[1])[:2]
    print(f"{mode} {dtype} row {row}: top-2 {[(t, round(lp, 4)) for t, lp in top]}", flush=True)
llm.stop()

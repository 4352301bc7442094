"""Fifty-first session (MAX_LEN and explicit buckets added in the fifty-second): what
RunnerConfig.prefill_context_buckets costs at start-up. The engine's default config
(RunnerConfig(), EngineConfig's defaults; 2,048 KV pages of 16, max_model_len MAX_LEN (default
4,096, at most the model's context), one registered adapter so that warm-up compiles the LoRA
variants as with --enable-lora), warmed up (one process each: the samplers' compilations are
cached within a process): the step shapes and the warm-up's seconds (lowering, compiling,
running), then the time of eight 256-token prompts prefilled and one token out (median of 3
after a warm pass).

Run: PYTHONPATH=. [MAX_LEN=32768] python3 docs/results/s51/warmup_cost.py MODEL BUCKETS
BUCKETS: default, none, or keys joined by "_" (512_2048_4096: the fifty-first session's
default, which its runs called "default")."""

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxlora
from configs.models import MODEL_PRESETS
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.llm import load_base_model
from jaxlora.lora import random_lora_weights
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES


def main():
    name, which = sys.argv[1], sys.argv[2]
    print(jax.devices()[0].device_kind, jax.__version__, name, flush=True)
    config, params, _ = load_base_model(name, seed=0, dtype=jnp.bfloat16, fuse_groups=1)
    adapter = random_lora_weights(config, "a", 16, MODULES, seed=1, std=0.01)
    vocab = min(1000, config.vocab_size - 100)
    prompts = [[100 + (i * 37 + j) % vocab for j in range(256)] for i in range(8)]
    once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    named = {"default": None, "none": ()}
    for buckets in (named[which] if which in named else tuple(map(int, which.split("_"))),):
        runner = RunnerConfig()
        if buckets is not None:
            runner = dataclasses.replace(runner, prefill_context_buckets=buckets)
        kv = KVCacheConfig(
            page_size=16,
            num_pages=2048,
            max_model_len=min(
                int(os.environ.get("MAX_LEN", "4096")), MODEL_PRESETS[name].context_length
            ),
        )
        engine_config = EngineConfig(kv=kv, runner=runner, warmup=False)
        llm = jaxlora.LLM(
            config,
            params=params,
            adapters={"a": adapter},
            engine_config=engine_config,
            dtype=jnp.bfloat16,
            load_workers=0,
        )
        try:
            warm = llm.engine.warmup()
            times = []
            for _ in range(4):
                start = time.perf_counter()
                llm.generate(prompts, sampling=once)
                times.append(time.perf_counter() - start)
        finally:
            llm.stop()
        print(
            f"max_model_len {kv.max_model_len}, buckets "
            f"{engine_config.runner.prefill_context_buckets}: "
            f"{len(warm['shapes'])} step shapes, lowered {warm['lower_s']:.1f} s, compiled "
            f"{warm['compile_s']:.1f} s, run {warm['warmup_s']:.1f} s; 8 x 256 prefill "
            f"median {statistics.median(times[1:]) * 1e3:.1f} ms",
            flush=True,
        )
        del llm


if __name__ == "__main__":
    main()

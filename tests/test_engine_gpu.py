"""On the GPU: the engine with the Pallas kernels (SGMV + paged attention) generates the same
tokens as with the jnp reference path."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.lora import random_lora_weights
from jaxlora.model import init_params
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES

# Big enough for tensor-core tiles and several pages per sequence, small enough for seconds.
CONFIG = dataclasses.replace(TINY, hidden_size=256, intermediate_size=512, num_heads=8,
                             num_kv_heads=2, head_dim=32, vocab_size=1024, num_layers=3)


@pytest.mark.gpu
def test_pallas_engine_matches_reference_engine():
    params = init_params(CONFIG, 0)
    adapters = {f"a{i}": random_lora_weights(CONFIG, f"a{i}", rank, modules, seed=i, std=0.05)
                for i, (rank, modules) in enumerate([(16, MODULES), (1, ("q_proj", "v_proj")),
                                                     (64, MODULES), (7, MODULES[3:])])}
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 1000, n))) for n in (1, 40, 17, 90, 5, 64)]
    names = ["a0", None, "a1", "a2", "a3", "a0"]
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for impl in ("reference", "pallas"):
        config = EngineConfig(
            kv=KVCacheConfig(page_size=16, num_pages=128, max_model_len=256),
            runner=RunnerConfig(max_batch=8, prefill_chunk=32, max_prefill_rows=4, impl=impl),
            lora_pool=LoraPoolConfig(max_rank=64, rows_per_page=16, pages_per_pool=64,
                                     max_slots=8),
            warmup=False)
        llm = jaxlora.LLM(CONFIG, params=params, adapters=adapters, engine_config=config,
                          load_workers=0)
        assert llm.engine.runner.impl == impl
        outputs[impl] = [o.token_ids for o in llm.generate(prompts, adapter=names,
                                                           sampling=sampling)]
    assert jax.default_backend() == "gpu"
    assert outputs["pallas"] == outputs["reference"]

"""One engine for a benchmark: random base weights created on the device, benchmark adapters
registered over a few shared host weight sets, every step shape compiled before timing."""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from jaxlora.config import ModelConfig
from jaxlora.engine import Engine, EngineConfig
from jaxlora.memory import AdapterManager, AdapterManagerConfig
from jaxlora.model import init_params

from .adapters import AdapterPopulation, make_store
from .timing import StepTimer, compile_step_shapes
from .workloads import adapter_name


@dataclasses.dataclass(frozen=True)
class SetupConfig:
    """dtype: of weights, adapter pool and KV cache (unless KVCacheConfig.cache_dtype names an
    fp8 format); weight_sets: distinct adapter weight sets in host memory (see
    jaxlora/bench/adapters.py); compile_threads: parallel XLA compilations."""

    dtype: str = "bfloat16"
    rank: int = 16
    weight_sets: int = 4
    compile_threads: int = 8
    seed: int = 0


@dataclasses.dataclass
class BenchEngine:
    engine: Engine
    manager: AdapterManager
    adapters: AdapterPopulation
    timer: StepTimer
    setup_seconds: dict

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.manager.store.dtype).itemsize

    @property
    def kv_itemsize(self) -> int:
        """Bytes of a K/V element in the engine's pools (1 with an fp8 cache)."""
        return self.engine.kv.k_pool.dtype.itemsize

    @property
    def projection_kernel_used(self) -> str:
        """What ``RunnerConfig.projection_kernel`` ("auto" included) resolved to: the
        ``Llama.projection_kernel`` of the engine's steps."""
        return self.engine.runner.model.projection_kernel

    @property
    def runner_config(self) -> dict:
        """The engine's ``RunnerConfig``, every field (nested configs and defaults included) as
        JSON values: a result file says which step ran even after a flag's default changes."""
        return json.loads(json.dumps(dataclasses.asdict(self.engine.runner.runner)))


def build_engine(
    model: ModelConfig,
    engine_config: EngineConfig,
    setup: SetupConfig,
    *,
    params=None,
    tokenizer=None,
) -> BenchEngine:
    """params: reuse base weights (None: random ones, created on the default device);
    tokenizer: the engine's (None: none; outputs are token ids only)."""
    dtype = jnp.dtype(setup.dtype)
    seconds = {}
    start = time.perf_counter()
    if params is None:
        params = jax.block_until_ready(init_params(model, setup.seed, dtype=dtype))
    seconds["init_params"] = time.perf_counter() - start
    start = time.perf_counter()
    store = make_store(model, engine_config.lora_pool, dtype.name)
    population = AdapterPopulation(
        store,
        rank=setup.rank,
        weight_sets=setup.weight_sets,
        name_of=adapter_name,
        seed=setup.seed + 1,
    )
    manager = AdapterManager(store, AdapterManagerConfig(load_workers=0))
    seconds["adapter_weight_sets"] = time.perf_counter() - start
    engine = Engine(
        model,
        params,
        dataclasses.replace(engine_config, warmup=False, compile_threads=setup.compile_threads),
        adapters=manager,
        tokenizer=tokenizer,
        dtype=dtype,
    )
    seconds["compile"] = compile_step_shapes(engine)
    bench = BenchEngine(
        engine=engine,
        manager=manager,
        adapters=population,
        timer=StepTimer(engine),
        setup_seconds=seconds,
    )
    # Every benchmark adapter has the same page counts: one copy compiles the manager's scatter
    # into the pool for all of them, before anything is timed.
    seconds["first_adapter_copy"] = preload(bench, population.ensure([0]))
    manager.evict_all_unused()
    return bench


def preload(bench: BenchEngine, names) -> float:
    """Makes the named adapters resident in the GPU pool (untimed by the rows); returns seconds."""
    start = time.perf_counter()
    handles = [bench.manager.acquire(n) for n in dict.fromkeys(names) if n is not None]
    for handle in handles:
        handle.wait()
    for handle in handles:
        handle.release()
    return time.perf_counter() - start

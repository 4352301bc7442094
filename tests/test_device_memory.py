"""--gpu_memory_utilization: the KV cache sized from the device's memory
(jaxlora.server.device_memory; the GPU run is docs/results/s40/memory_check.py)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import LLAMA2_7B, LLAMA3_8B, MISTRAL_7B, TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.errors import ConfigError
from jaxlora.lora import empty_pools
from jaxlora.server import device_memory as dm
from jaxlora.server.launch import LaunchConfig, engine_config_for, kv_page_bytes
from pallas_kernels import layout

GIB = 2**30
H100_LIMIT = int(0.9 * 79.6 * GIB)  # the allocator's limit at a fraction of 0.9


def working_of(model, config, *, max_batch, itemsize=2, shards=1):
    """step_working_bytes of an engine config built by engine_config_for, its prefill
    attention counted as the server counts it."""
    runner = config.runner
    attention = dm.prefill_attention_bytes(
        model,
        rows=runner.max_prefill_rows,
        chunk=runner.prefill_chunk,
        max_model_len=config.kv.max_model_len,
        key_block=runner.prefill_key_block,
        itemsize=itemsize,
        shards=shards,
    )
    decode = dm.decode_attention_bytes(
        model,
        rows=runner.max_batch,
        max_model_len=config.kv.max_model_len,
        itemsize=itemsize,
        shards=shards,
    )
    return dm.step_working_bytes(
        model,
        max_num_tokens=config.max_num_tokens,
        max_batch=max_batch,
        shards=shards,
        prefill_attention=attention,
        decode_attention=decode if shards > 1 else 0,
    )


@pytest.fixture
def fraction(monkeypatch):
    """XLA_PYTHON_CLIENT_MEM_FRACTION as the test sets it (unset by default); whatever the
    code under test writes there is undone too (setenv first records the value to restore)."""
    monkeypatch.setenv(dm.MEMORY_FRACTION_VARIABLE, "0.75")
    monkeypatch.delenv(dm.MEMORY_FRACTION_VARIABLE)

    def set_fraction(value: str | None):
        if value is None:
            monkeypatch.delenv(dm.MEMORY_FRACTION_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(dm.MEMORY_FRACTION_VARIABLE, value)

    return set_fraction


def test_the_kv_cache_gets_what_weights_pools_and_working_memory_leave(fraction):
    """llama-2-7b on an H100 whose allocator holds 90%: the pages are the share less the
    weights in use, the weights still on the host, the adapter pools and the working
    estimate, divided by the page's bytes, exactly; the fp8 cache holds twice the pages."""
    fraction("0.9")
    weights = 13_476_839_424  # llama-2-7b in bf16
    memory = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=weights)]
    launch = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.9, max_batch=64)
    config = engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=memory)
    pools = dm.adapter_pool_bytes(LLAMA2_7B, config.lora_pool, jnp.bfloat16)
    working = working_of(LLAMA2_7B, config, max_batch=64)
    page = kv_page_bytes(LLAMA2_7B, launch, 16)
    assert page == 2 * 32 * 16 * 32 * 128 * 2
    expected = (H100_LIMIT - weights - pools - working) // page
    assert config.kv.num_pages == expected
    assert 6_000 < expected < 7_000  # about 52 GiB of K/V: ~107k tokens of 512 KiB
    fp8 = dataclasses.replace(launch, kv_cache_dtype="fp8")
    assert engine_config_for(LLAMA2_7B, fp8, backend="gpu", memory=memory).kv.num_pages == (
        (H100_LIMIT - weights - pools - working) // (page // 2)
    )
    # Weights not yet placed count as if they were.
    host = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=0)]
    pending = engine_config_for(
        LLAMA2_7B, launch, backend="gpu", memory=host, pending_bytes=weights
    )
    assert pending.kv.num_pages == expected


def test_a_fragmented_region_sizes_the_cache_by_its_largest_free_block(fraction):
    """The H100 case of the forty-first session: the weights left a hole of a few GiB below
    the free tail, so the K and V pools and the adapter pools must fit in the tail. The cache
    is what the tail holds beside the adapter pools (less the rounding slack), the log names
    the block; a hole smaller than the working reserve leaves the share's rule in force."""
    fraction("0.9")
    weights, hole = 13_476_839_424, 3 * GIB
    launch = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.9, max_batch=64)
    whole = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=weights)]
    unfragmented = engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=whole)
    tail = H100_LIMIT - weights - hole
    holed = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=weights, largest_free=tail)]
    config = engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=holed)
    pools = dm.adapter_pool_bytes(LLAMA2_7B, config.lora_pool, jnp.bfloat16)
    page = kv_page_bytes(LLAMA2_7B, launch, 16)
    assert config.kv.num_pages == (tail - pools - dm.CONTIGUOUS_SLACK_BYTES) // page
    assert config.kv.num_pages * page + pools <= tail  # K, V and the pools fit in the tail
    working = working_of(LLAMA2_7B, config, max_batch=64)
    assert working < hole  # the share alone would not have seen the hole
    assert unfragmented.kv.num_pages - config.kv.num_pages == 60  # the hole less the reserve
    budget = dm.kv_budget(0.9, holed, pending=0, adapter_pools=pools, working=GIB)
    assert budget.bound_by_block and budget.largest_free == tail
    assert "bound by the largest free block, 56.09 GiB of the 59.09 free" in budget.describe()
    # Weights still to place go in the block too.
    pending = dm.kv_budget(0.9, holed, pending=GIB, adapter_pools=pools, working=GIB)
    assert pending.kv_cache == budget.kv_cache - GIB
    # A block that holds the whole free share binds nothing.
    small_hole = H100_LIMIT - weights - working // 2
    free = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=weights, largest_free=small_hole)]
    assert engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=free).kv == unfragmented.kv
    unbound = dm.kv_budget(0.9, free, pending=0, adapter_pools=pools, working=working)
    assert not unbound.bound_by_block
    assert unbound.describe().endswith(f"(largest free block {small_hole / GIB:.2f} GiB)")
    # A hole so large nothing fits beside the pools is refused like a full device.
    with pytest.raises(ConfigError, match="leaves no memory for the KV cache .* largest free"):
        dm.kv_budget(
            0.9,
            [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=weights, largest_free=pools)],
            pending=0,
            adapter_pools=pools,
            working=GIB,
        )


def test_the_share_is_of_the_gpu_and_capped_at_the_allocators_limit(fraction):
    """JAX's allocator holds XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU (0.75 unset): a smaller
    utilization is that share of the GPU, a larger one stops at the limit."""
    memory = [dm.DeviceMemory("cuda:0", limit=60 * GIB, in_use=0)]
    args = dict(pending=0, adapter_pools=0, working=0)
    assert dm.kv_budget(0.6, memory, **args).share == 48 * GIB  # 0.6 of an 80 GiB GPU
    assert dm.kv_budget(0.9, memory, **args).share == 60 * GIB  # capped
    fraction("0.5")
    assert dm.kv_budget(0.25, memory, **args).share == 30 * GIB  # a 120 GiB GPU
    fraction("2")
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='2': expected"):
        dm.kv_budget(0.5, memory, **args)


def test_the_tightest_device_decides_and_tensor_parallelism_splits_the_pools(fraction):
    memory = [
        dm.DeviceMemory("cuda:0", limit=60 * GIB, in_use=4 * GIB),
        dm.DeviceMemory("cuda:1", limit=60 * GIB, in_use=6 * GIB),
    ]
    budget = dm.kv_budget(0.75, memory, pending=GIB, adapter_pools=2 * GIB, working=GIB)
    assert budget.device == "cuda:1" and budget.kv_cache == 50 * GIB
    assert "cuda:1: share 60.00 GiB = in use 6.00" in budget.describe()
    pool = LoraPoolConfig(max_rank=64, rows_per_page=16, pages_per_pool=256)
    one = dm.adapter_pool_bytes(LLAMA3_8B, pool, jnp.bfloat16)
    two = dm.adapter_pool_bytes(LLAMA3_8B, pool, jnp.bfloat16, shards=2)
    embed = 32 * 256 * 16 * 4096 * 2
    assert two == embed + (one - embed) // 2
    tp2 = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.75, tensor_parallel_size=2)
    config = engine_config_for(LLAMA3_8B, tp2, backend="gpu", memory=memory)
    working = working_of(LLAMA3_8B, config, max_batch=32, shards=2)
    assert config.kv.num_pages == (54 * GIB - two - working) // kv_page_bytes(LLAMA3_8B, tp2, 16)


def test_the_pool_bytes_are_the_pools_the_engine_allocates():
    pool = LoraPoolConfig(max_rank=16, rows_per_page=8, pages_per_pool=5)
    apart = dataclasses.replace(pool, axis_pages=(("mlp", 2), ("heads", 9)))
    for dtype in (jnp.float32, jnp.bfloat16):
        for config in (pool, apart):
            arrays = empty_pools(TINY, config, dtype)
            assert dm.adapter_pool_bytes(TINY, config, dtype) == sum(
                a.nbytes for a in arrays.values()
            )
    assert empty_pools(TINY, apart)["mlp"].shape[1] == 2


def test_adapter_pool_axis_pages_flag_sizes_the_pools_and_the_kv_cache(fraction):
    """--adapter_pool_axis_pages: pools named there get their own page counts (the others
    --adapter_pool_pages'), and the memory they no longer take goes to the KV cache."""
    fraction("0.9")
    memory = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=13_476_839_424)]
    launch = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.9, adapter_pool_pages=256)
    uniform = engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=memory)
    # Adapters on q_proj and v_proj only: 2 embed pages for 1 heads and 1 kv_heads page, no mlp.
    attention = dataclasses.replace(
        launch, adapter_pool_axis_pages=("heads=128", " kv_heads = 128", "mlp=1")
    )
    apart = engine_config_for(LLAMA2_7B, attention, backend="gpu", memory=memory)
    assert apart.lora_pool.axis_pages == (("heads", 128), ("kv_heads", 128), ("mlp", 1))
    assert [apart.lora_pool.pages_in(a) for a in layout.POOL_AXES] == [256, 128, 128, 1]
    saved = dm.adapter_pool_bytes(LLAMA2_7B, uniform.lora_pool, jnp.bfloat16) - (
        dm.adapter_pool_bytes(LLAMA2_7B, apart.lora_pool, jnp.bfloat16)
    )
    assert saved == 32 * 16 * 2 * (128 * 4096 * 2 + 255 * 11008)
    page = kv_page_bytes(LLAMA2_7B, launch, 16)
    assert apart.kv.num_pages - uniform.kv.num_pages in (saved // page, saved // page + 1)
    for bad in ("mlp", "mlp=0", "mlp=-1", "mlp=x", "ffn=4", "mlp=1,mlp=2"):
        with pytest.raises(ConfigError, match=r"--adapter_pool_axis_pages entry '.*': expected"):
            engine_config_for(
                LLAMA2_7B,
                dataclasses.replace(launch, adapter_pool_axis_pages=tuple(bad.split(","))),
                backend="gpu",
                memory=memory,
            )


def test_noenable_lora_gives_the_adapter_pools_memory_to_the_kv_cache(fraction):
    """--noenable_lora (the base model alone): the pools shrink to one page each and one slot,
    and what the default pools took goes to the KV cache; a flag that names adapters or sizes
    their pools is refused, naming it."""
    fraction("0.9")
    memory = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=13_476_839_424)]
    launch = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.9)
    served = engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=memory)
    base_only = dataclasses.replace(launch, enable_lora=False)
    alone = engine_config_for(LLAMA2_7B, base_only, backend="gpu", memory=memory)
    assert [alone.lora_pool.pages_in(a) for a in layout.POOL_AXES] == [1, 1, 1, 1]
    assert alone.lora_pool.max_slots == 1
    saved = dm.adapter_pool_bytes(LLAMA2_7B, served.lora_pool, jnp.bfloat16) - (
        dm.adapter_pool_bytes(LLAMA2_7B, alone.lora_pool, jnp.bfloat16)
    )
    assert saved > 6 * 10**9  # llama-2-7b's default pools, 256 pages each
    page = kv_page_bytes(LLAMA2_7B, launch, 16)
    assert alone.kv.num_pages - served.kv.num_pages in (saved // page, saved // page + 1)
    for field, value, flag in (
        ("lora_modules", ("a=/x",), "--lora_modules"),
        ("allowed_adapter_roots", ("/x",), "--allowed_adapter_roots"),
        ("load_adapters_on_demand", True, "--load_adapters_on_demand"),
        ("adapter_pool_pages", 64, "--adapter_pool_pages"),
        ("max_rank", 64, "--max_rank"),
    ):
        bad = dataclasses.replace(base_only, **{field: value})
        with pytest.raises(ConfigError, match=f"--noenable_lora .* but {flag}.* was given"):
            engine_config_for(LLAMA2_7B, bad, backend="gpu", memory=memory)


def test_nothing_left_or_less_than_a_sequence_is_refused(fraction):
    full = [dm.DeviceMemory("cuda:0", limit=20 * GIB, in_use=15 * GIB)]
    launch = LaunchConfig(dtype="bfloat16", gpu_memory_utilization=0.75)
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization 0.75: leaves no memory .*"):
        engine_config_for(LLAMA2_7B, launch, backend="gpu", memory=full)
    # 3 GiB less the pools and working memory: 178 pages of 8 MiB, not the 256 of one
    # 4,096-token sequence.
    small = [dm.DeviceMemory("cuda:0", limit=20 * GIB, in_use=17 * GIB)]
    tiny_pool = dataclasses.replace(launch, adapter_pool_pages=16)
    with pytest.raises(
        ConfigError,
        match="gpu_memory_utilization 0.75 leaves .* one sequence of max_model_len 4096 needs 256",
    ):
        engine_config_for(LLAMA2_7B, tiny_pool, backend="gpu", memory=small)


def test_launch_config_checks_the_share_and_its_rivals():
    for bad in (0, 0.0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ConfigError, match="gpu_memory_utilization: expected a fraction"):
            LaunchConfig(gpu_memory_utilization=bad)
    assert LaunchConfig(gpu_memory_utilization=1).gpu_memory_utilization == 1
    with pytest.raises(ConfigError, match=r"kv_pages \(100\) and gpu_memory_utilization"):
        LaunchConfig(gpu_memory_utilization=0.9, kv_pages=100)
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes .* both size the KV cache"):
        LaunchConfig(gpu_memory_utilization=0.9, kv_cache_memory_bytes=GIB)


def test_a_device_without_a_memory_report_is_refused_by_name():
    """JAX's CPU backend reports no memory: the share cannot be sized there."""
    with pytest.raises(ConfigError, match="reports no memory limit .* --kv_cache_memory"):
        dm.device_memory(jax.devices()[:1])
    with pytest.raises(ConfigError, match="reports no memory limit"):
        engine_config_for(TINY, LaunchConfig(gpu_memory_utilization=0.5), backend="cpu")

    class FakeGpu:
        def memory_stats(self):
            return {"bytes_limit": 100, "bytes_in_use": 40, "peak_bytes_in_use": 50}

        def __str__(self):
            return "cuda:0"

    assert dm.device_memory([FakeGpu()]) == [dm.DeviceMemory("cuda:0", 100, 40)]

    class RegionGpu(FakeGpu):
        def __init__(self, region):
            self.region = region

        def memory_stats(self):
            # JAX's keys on an H100 (docs/results/s40/call1/memory_stats.txt)
            return {
                **super().memory_stats(),
                "largest_free_block_bytes": 35 if self.region else 0,
                "pool_bytes": self.region,
            }

    assert dm.device_memory([RegionGpu(100)]) == [dm.DeviceMemory("cuda:0", 100, 40, 35)]
    # Before the first allocation there is no region and the report's 0 means nothing.
    assert dm.device_memory([RegionGpu(0)]) == [dm.DeviceMemory("cuda:0", 100, 40, None)]
    # The log line once warm: each device's use, peak and limit; nothing for the CPU.
    assert dm.describe_device_memory(jax.devices()[:1]) == ""

    class BigGpu(FakeGpu):
        def __init__(self, index):
            self.index = index

        def memory_stats(self):
            return {
                "bytes_limit": 60 * GIB,
                "bytes_in_use": 40 * GIB,
                "peak_bytes_in_use": 41 * GIB,
            }

        def __str__(self):
            return f"cuda:{self.index}"

    gpus = [BigGpu(0), BigGpu(1)]
    assert dm.describe_device_memory(gpus) == (
        "cuda:0: in use 40.00 GiB, peak 41.00 GiB of 60.00 GiB; "
        "cuda:1: in use 40.00 GiB, peak 41.00 GiB of 60.00 GiB"
    )
    # /metrics' jaxlora_device_memory_bytes{device, kind}
    assert dm.memory_report(gpus + jax.devices()[:1]) == {
        (f"cuda:{i}", kind): value
        for i in (0, 1)
        for kind, value in (("in_use", 40 * GIB), ("peak", 41 * GIB), ("limit", 60 * GIB))
    }


def test_the_share_sets_the_allocators_fraction_before_the_backend_starts(
    fraction, monkeypatch, caplog
):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    dm.reserve_device_memory(0.9)
    import os

    assert os.environ[dm.MEMORY_FRACTION_VARIABLE] == "0.9"
    # Set already (by the user): kept; a smaller one caps the share, with a warning.
    fraction("0.5")
    with caplog.at_level(logging.WARNING, logger="jaxlora.server"):
        dm.reserve_device_memory(0.9)
    assert os.environ[dm.MEMORY_FRACTION_VARIABLE] == "0.5"
    assert "may hold only 0.5 of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION is set)" in caplog.text
    # Too late: the backend started with the default fraction.
    fraction(None)
    caplog.clear()
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="jaxlora.server"):
        dm.reserve_device_memory(0.9)
        dm.reserve_device_memory(0.7)  # within the default 0.75: nothing to say
    assert dm.MEMORY_FRACTION_VARIABLE not in os.environ
    assert caplog.text.count("its backend started before the share could be set") == 1


def test_weights_on_the_host_are_counted_per_device():
    params = {
        "host": np.zeros((1000,), np.float32),
        "nested": {"host": np.zeros((10, 10), np.float16), "device": jnp.zeros((5000,))},
    }
    assert dm.host_bytes_per_device(params, 1) == 4000 + 200
    assert dm.host_bytes_per_device(params, 3) == 1400


def test_the_working_estimate_grows_with_the_step():
    small = dm.step_working_bytes(LLAMA2_7B, max_num_tokens=256, max_batch=32)
    assert small > dm.FIXED_WORKING_BYTES
    assert dm.step_working_bytes(LLAMA2_7B, max_num_tokens=512, max_batch=32) > small
    assert dm.step_working_bytes(LLAMA2_7B, max_num_tokens=256, max_batch=64) > small
    assert dm.step_working_bytes(LLAMA2_7B, max_num_tokens=256, max_batch=32, shards=2) < small


def test_the_prefill_attention_transients_are_counted():
    """A prefill step's attention gathers K and V over the whole table (cuDNN's one pass: past
    prefill_key_block too) and XLA's float32 scores over at most a block: at Mistral 7B's
    max_model_len 32,768 the step reserve grows by what those take beyond the MLP's
    activations, so the cache gets that many bytes fewer; tensor parallelism splits the heads."""
    args = dict(rows=4, chunk=64, key_block=4096, itemsize=2)
    long = dm.prefill_attention_bytes(MISTRAL_7B, max_model_len=32768, **args)
    gathered = 2 * 4 * 32768 * 8 * 128 * 2
    assert long == gathered + 4 * 64 * 32768 * 3 + 2 * 4 * 32 * 64 * 4096 * 4
    unblocked = dm.prefill_attention_bytes(
        MISTRAL_7B, max_model_len=32768, **(args | {"key_block": None})
    )
    assert unblocked - long == 2 * 4 * 32 * 64 * (32768 - 4096) * 4
    halves = dm.prefill_attention_bytes(MISTRAL_7B, max_model_len=32768, shards=2, **args)
    assert halves == gathered // 2 + 4 * 64 * 32768 * 3 + 4 * 32 * 64 * 4096 * 4
    small = dm.step_working_bytes(MISTRAL_7B, max_num_tokens=512, max_batch=32)
    assert (
        dm.step_working_bytes(MISTRAL_7B, max_num_tokens=512, max_batch=32, prefill_attention=long)
        - small
        == long - dm.LIVE_ACTIVATIONS * 512 * (4 * 4096 + 6144 + 2 * 14336) * 4
    )
    assert (
        dm.step_working_bytes(MISTRAL_7B, max_num_tokens=512, max_batch=32, prefill_attention=1)
        == small
    )  # (smaller than the activations: they count)
    memory = [dm.DeviceMemory("cuda:0", limit=H100_LIMIT, in_use=16 * GIB)]
    pages = {}
    for max_model_len in (4096, 32768):
        launch = LaunchConfig(
            dtype="bfloat16", gpu_memory_utilization=0.9, max_model_len=max_model_len
        )
        config = engine_config_for(MISTRAL_7B, launch, backend="gpu", memory=memory)
        working = working_of(MISTRAL_7B, config, max_batch=config.runner.max_batch)
        pools = dm.adapter_pool_bytes(MISTRAL_7B, config.lora_pool, jnp.bfloat16)
        page = kv_page_bytes(MISTRAL_7B, launch, 16)
        assert config.kv.num_pages == (H100_LIMIT - 16 * GIB - pools - working) // page
        pages[max_model_len] = config.kv.num_pages
    assert (
        pages[4096] - pages[32768]
        >= (long - dm.prefill_attention_bytes(MISTRAL_7B, max_model_len=4096, **args))
        // kv_page_bytes(MISTRAL_7B, launch, 16)
        > 0
    )


def test_the_tensor_parallel_decode_attention_transients_are_counted(fraction):
    """A tensor-parallel engine's decode steps run the jnp attention, which gathers every
    row's K and V over the whole table (in the pool's dtype and in float32) and scores them in
    float32: at Mistral 7B's max_model_len 32,768, batch 32 and 2 devices that is 6.1 GiB a
    device, more than a prefill step's transients, and the cache gets that many bytes fewer.
    One device (the Pallas kernel reads the pages in place) counts none of it."""
    decode = dm.decode_attention_bytes(
        MISTRAL_7B, rows=32, max_model_len=32768, itemsize=2, shards=2
    )
    assert decode == 2 * 32 * 32768 * 4 * 128 * (2 + 4) + 2 * 32 * 16 * 32768 * 4
    assert decode > 6 * GIB
    memory = [dm.DeviceMemory(f"cuda:{i}", limit=H100_LIMIT, in_use=8 * GIB) for i in range(2)]
    pages = {}
    for tp in (1, 2):
        launch = LaunchConfig(
            dtype="bfloat16",
            gpu_memory_utilization=0.9,
            max_model_len=32768,
            tensor_parallel_size=tp,
        )
        config = engine_config_for(MISTRAL_7B, launch, backend="gpu", memory=memory)
        assert config.runner.max_batch == 32
        working = working_of(MISTRAL_7B, config, max_batch=32, shards=tp)
        pools = dm.adapter_pool_bytes(MISTRAL_7B, config.lora_pool, jnp.bfloat16, shards=tp)
        page = kv_page_bytes(MISTRAL_7B, launch, 16)
        assert config.kv.num_pages == (H100_LIMIT - 8 * GIB - pools - working) // page
        pages[tp] = config.kv.num_pages
        prefill = dm.prefill_attention_bytes(
            MISTRAL_7B,
            rows=config.runner.max_prefill_rows,
            chunk=config.runner.prefill_chunk,
            max_model_len=32768,
            key_block=config.runner.prefill_key_block,
            itemsize=2,
            shards=tp,
        )
        if tp == 2:
            assert decode > prefill
            assert working == dm.step_working_bytes(
                MISTRAL_7B,
                max_num_tokens=config.max_num_tokens,
                max_batch=32,
                shards=2,
                decode_attention=decode,
            )
        else:
            assert working == dm.step_working_bytes(
                MISTRAL_7B,
                max_num_tokens=config.max_num_tokens,
                max_batch=32,
                prefill_attention=prefill,
            )
    assert pages[2] > 0 and pages[1] > 0


def test_the_serving_flag_and_build_state(fraction, monkeypatch):
    """--gpu_memory_utilization reaches LaunchConfig; build_state sizes the engine from the
    devices' reports (faked here: the CPU reports none) and keeps the weights counted."""
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.server import launch as launch_module

    try:
        flags.FLAGS(["serve.py", "--gpu_memory_utilization=0.85"])
        launch = launch_flags.launch_config()
        flags.FLAGS(["serve.py", "--gpu_memory_utilization=0.85", "--kv_pages=10"])
        with pytest.raises(ConfigError, match="both size the KV cache"):
            launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert launch.gpu_memory_utilization == 0.85 and launch.kv_pages is None

    fraction("0.85")
    seen = []

    def fake_memory(devices):
        seen.append(len(devices))
        return [dm.DeviceMemory("fake:0", limit=2 * GIB + 64 * 2**20, in_use=0)]

    monkeypatch.setattr(launch_module, "device_memory", fake_memory)
    small = LaunchConfig(
        model="tiny",
        gpu_memory_utilization=0.85,
        max_batch=2,
        max_num_tokens=64,
        adapter_pool_pages=4,
        max_model_len=64,
        switch_interval_ms=0.5,
    )
    state = launch_module.build_state(small)
    try:
        assert state.config.switch_interval_s == 0.0005  # (--switch_interval_ms, in ms)
        kv = state.llm.engine.engine_config.kv
        working = working_of(TINY, state.llm.engine.engine_config, max_batch=2, itemsize=4)
        pools = dm.adapter_pool_bytes(TINY, state.llm.engine.engine_config.lora_pool, jnp.float32)
        left = 2 * GIB + 64 * 2**20 - working - pools
        assert seen == [1]
        assert kv.num_pages == left // kv_page_bytes(TINY, small, kv.page_size)
    finally:
        state.llm.stop()


def test_a_kv_cache_the_device_cannot_hold_is_refused_at_build(monkeypatch):
    """JAX reports a failed allocation where the buffer is first used: without the check the
    first step failed (on the H100, 'allocate 25.87GiB' in jit__packed_forward). The pools are
    now waited for at build, and an allocation the device refuses is a ConfigError naming the
    cache's size and the flags that set it; other runtime errors pass through."""
    from jaxlora.engine import kv_cache

    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.87GiB\nsummary"
        )

    config = kv_cache.KVCacheConfig(num_pages=64, page_size=16, max_model_len=256)
    monkeypatch.setattr(kv_cache.jax, "device_put", refuse)
    with pytest.raises(
        ConfigError,
        match=r"KV cache: 64 pages of 16 tokens \(0.00 GiB in all, K and V, cache dtype "
        r"float32\) do not fit .* --gpu_memory_utilization\) \(RESOURCE_EXHAUSTED: Out of "
        r"memory while trying to allocate 25.87GiB\)$",
    ):
        kv_cache.KVCacheManager(TINY, config)

    def broken(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(kv_cache.jax, "device_put", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        kv_cache.KVCacheManager(TINY, config)


def test_build_state_fuses_the_weights_before_the_engine_allocates(monkeypatch):
    """The server fuses q|k|v and gate|up before the LLM (and its KV cache) is built, so the
    device never holds both forms beside the cache (one group a device with tensor
    parallelism); unfused with --nofuse_projections."""
    from jaxlora import llm as llm_module
    from jaxlora.model import projections_fused
    from jaxlora.server import launch as launch_module

    seen = []
    original = llm_module.LLM.__init__

    def record(self, *args, params=None, **kwargs):
        seen.append(projections_fused(params))
        original(self, *args, params=params, **kwargs)

    monkeypatch.setattr(llm_module.LLM, "__init__", record)
    for fuse, tp in ((True, 1), (False, 1), (True, 2)):
        launch = LaunchConfig(
            model="tiny", max_batch=2, kv_pages=32, fuse_projections=fuse, tensor_parallel_size=tp
        )
        state = launch_module.build_state(launch)
        try:
            params = state.llm.engine.runner.params
            assert projections_fused(params) == fuse
            if tp == 2:  # one group of q|k|v columns a device
                assert params["layers"]["attn"]["qkv_proj"]["kernel"].shape[-2] == 2
        finally:
            state.llm.stop()
    assert seen == [True, False, True]


def test_an_llm_fuses_the_weights_it_loads_before_allocating(monkeypatch):
    """LLM("preset") fuses what it loaded before the engine allocates (no second copy of
    q|k|v and gate|up beside the KV cache; one group a device with tensor parallelism) and
    generates the same tokens; weights the caller passes are theirs to drop."""
    from jaxlora import llm as llm_module
    from jaxlora.engine import engine as engine_module
    from jaxlora.model import projections_fused

    seen = []
    original = engine_module.Engine.__init__

    def record(self, config, params, *args, **kwargs):
        seen.append(projections_fused(params))
        original(self, config, params, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", record)
    from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
    from jaxlora.sampling import SamplingParams

    small = EngineConfig(
        kv=KVCacheConfig(num_pages=32), runner=RunnerConfig(max_batch=2), warmup=False
    )
    unfused = dataclasses.replace(small, runner=RunnerConfig(max_batch=2, fuse_projections=False))
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens = []
    for engine_config, tp in ((small, 1), (unfused, 1), (small, 2)):
        llm = llm_module.LLM("tiny", engine_config=engine_config, tp=tp)
        try:
            tokens.append(llm.generate([[5, 6, 7, 8]], sampling=sampling)[0].token_ids)
        finally:
            llm.stop()
    assert seen == [True, False, True]
    assert tokens[1] == tokens[0] and tokens[2] == tokens[0]


def test_a_presets_weights_come_fused_from_one_executable():
    """init_params(fuse_groups=g) is fuse_projections(init_params(...), groups=g) bit for bit,
    made in one executable (fusing device-resident kernels afterwards leaves their hole below
    the fused ones); load_base_model passes it to presets; 0 keeps the canonical form."""
    from jaxlora.llm import load_base_model
    from jaxlora.model import fuse_projections, init_params, projections_fused

    for groups in (1, 2):
        made = init_params(TINY, 3, jnp.bfloat16, fuse_groups=groups)
        after = fuse_projections(init_params(TINY, 3, jnp.bfloat16), groups=groups)
        assert projections_fused(made)
        assert jax.tree.structure(made) == jax.tree.structure(after)
        for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(after), strict=True):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert not projections_fused(init_params(TINY, 3))
    config, params, _ = load_base_model("tiny", seed=3, fuse_groups=2)
    assert config == TINY and params["layers"]["mlp"]["gate_up_proj"]["kernel"].shape[-2] == 2
    assert not projections_fused(load_base_model("tiny", seed=3)[1])


def test_adapter_host_memory_bounds_the_disk_adapters_kept_in_ram():
    """--adapter_host_memory (LaunchConfig.adapter_host_memory_bytes; vLLM's --max-cpu-loras in
    bytes): the demo's three disk adapters all stay in RAM without it; with one adapter's bytes
    at most one does, the others dropped back to disk and read again when next used."""
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.sampling import SamplingParams
    from jaxlora.server import launch as launch_module

    try:
        flags.FLAGS(["serve.py", "--adapter_host_memory=1MiB"])
        assert launch_flags.launch_config().adapter_host_memory_bytes == 2**20
        flags.FLAGS(["serve.py", "--adapter_host_memory=lots"])
        with pytest.raises(ConfigError, match="--adapter_host_memory='lots'"):
            launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="adapter_host_memory_bytes: expected None or an int"):
            LaunchConfig(adapter_host_memory_bytes=bad)

    sampling = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    def serve_each(budget, rounds=2):
        state = launch_module.build_state(
            LaunchConfig(max_batch=2, kv_pages=64, adapter_host_memory_bytes=budget)
        )
        try:
            names = state.llm.adapters.store.names()
            for _ in range(rounds):
                for name in names:
                    # (evicted from the GPU pool between uses, so each use reads the host copy)
                    state.llm.generate([[5, 6, 7]], adapter=name, sampling=sampling)
                    state.llm.adapters.evict(name)
            metrics = dict(
                line.rsplit(" ", 1)
                for line in state.metrics_text().splitlines()
                if line.startswith("jaxlora_adapter")
            )
            return names, state.llm.adapters.store.stats(), metrics
        finally:
            state.llm.stop()

    names, unbounded, metrics = serve_each(None)
    assert len(names) == 3 and unbounded.cached == 3 and unbounded.drops == 0
    assert unbounded.loads == 3  # each read from disk once
    assert "jaxlora_adapter_host_budget_bytes" not in metrics
    one = unbounded.host_bytes // 3
    names, bounded, metrics = serve_each(one + one // 2)
    assert bounded.host_budget_bytes == one + one // 2
    assert bounded.cached == 1 and bounded.host_bytes <= one + one // 2
    assert bounded.drops >= 5 and bounded.loads == 6  # every use read from disk again
    # /metrics says so
    assert float(metrics["jaxlora_adapter_host_budget_bytes"]) == one + one // 2
    assert float(metrics["jaxlora_adapter_host_bytes"]) == bounded.host_bytes
    assert float(metrics["jaxlora_adapter_host_drops_total"]) == bounded.drops
    assert float(metrics["jaxlora_adapter_disk_reads_total"]) == 6
    assert float(metrics["jaxlora_adapters_in_host_memory"]) == 1


def test_vllm_command_lines_carry_over():
    """serve.py and run_batch.py take vLLM's dashed options (--max-num-seqs=8,
    --no-enable-prefix-caching) and its names for the same sizes (max_num_seqs, max_loras,
    max_lora_rank, max_num_batched_tokens, block_size); anything else is left to absl."""
    from absl import flags

    from jaxlora import launch_flags

    spelled = launch_flags.vllm_spelling(
        [
            "serve.py",
            "--max-num-seqs=8",
            "--gpu-memory-utilization",
            "0.5",
            "--no-enable-prefix-caching",
            "--no-such-option=1",
            "--",
            "--max-num-seqs=1",
        ]
    )
    assert spelled == [
        "serve.py",
        "--max_num_seqs=8",
        "--gpu_memory_utilization",
        "0.5",
        "--noenable_prefix_caching",
        "--no-such-option=1",
        "--",
        "--max-num-seqs=1",
    ]
    try:
        launch_flags.parse_flags(
            [
                "serve.py",
                "--max-num-seqs=8",
                "--max_loras=3",
                "--max-lora-rank=32",
                "--max_num_batched_tokens=300",
                "--block-size=32",
                "--enable-prefix-caching",
            ]
        )
        launch = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert (launch.max_batch, launch.max_slots, launch.max_rank) == (8, 3, 32)
    assert (launch.max_num_tokens, launch.page_size, launch.enable_prefix_caching) == (
        300,
        32,
        True,
    )
    with pytest.raises(SystemExit):
        launch_flags.parse_flags(["serve.py", "--max-num-seqs=many"])
    flags.FLAGS.unparse_flags()
    # vLLM's request-log switches: --enable-log-requests is --log_requests; the older
    # --disable-log-requests is this server's default, refused beside it.
    for argv, logged in (
        (["serve.py", "--enable-log-requests"], True),
        (["serve.py", "--disable-log-requests"], False),
        (["serve.py"], False),
        (["serve.py", "--enable-log-requests", "--disable-log-requests"], None),
    ):
        try:
            launch_flags.parse_flags(argv)
            if logged is None:
                with pytest.raises(ConfigError, match="--disable_log_requests were both given"):
                    launch_flags.launch_config()
            else:
                assert launch_flags.launch_config().log_requests is logged, argv
        finally:
            flags.FLAGS.unparse_flags()

"""Measures the adapter memory system on the current device (driven by scripts/bench_adapters.py).

- host-to-device transfer rates of one adapter's bytes (pageable numpy, numpy via pinned_host,
  pinned_host only): the ceiling the adapter loads are judged against;
- the manager's cold-acquire latency (acquire -> ready, weights in host RAM), one batched copy of
  several adapters, and a stand-in decode step run back to back with and without cold-adapter
  copies in flight (the copies must not slow the steps);
- registration of thousands of PEFT directories (header-only validation) and the host memory a
  registered and a resident adapter costs.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import tempfile
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import get_model_preset
from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.lora import LoraWeights
from jaxlora.memory.manager import AdapterManager, AdapterManagerConfig
from jaxlora.memory.store import AdapterStore, AdapterStoreConfig
from pallas_kernels.layout import MODULES


def _seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def measure_transfers(nbytes: int, repeats: int = 5) -> dict:
    device = jax.devices()[0]
    host = np.random.default_rng(0).integers(0, 255, nbytes, np.uint8).view(jnp.bfloat16)
    to_device = jax.sharding.SingleDeviceSharding(device)
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    on_pinned = jax.block_until_ready(jax.device_put(host, pinned))
    results = {
        "numpy_to_device": _seconds(lambda: jax.device_put(host, to_device), repeats),
        "numpy_to_pinned": _seconds(lambda: jax.device_put(host, pinned), repeats),
        "numpy_via_pinned_to_device": _seconds(
            lambda: jax.device_put(jax.device_put(host, pinned), to_device), repeats
        ),
        "pinned_to_device": _seconds(lambda: jax.device_put(on_pinned, to_device), repeats),
    }
    # How long the dispatching thread is held by a device_put of numpy (asynchronous or not).
    start = time.perf_counter()
    array = jax.device_put(host, to_device)
    dispatch = time.perf_counter() - start
    array.block_until_ready()
    return {
        "bytes": nbytes,
        **{f"{k}_GBps": round(nbytes / min(v) / 1e9, 2) for k, v in results.items()},
        **{f"{k}_ms": round(min(v) * 1e3, 3) for k, v in results.items()},
        "numpy_to_device_dispatch_ms": round(dispatch * 1e3, 3),
    }


def random_adapter(config: ModelConfig, rank: int, seed: int) -> LoraWeights:
    rng = np.random.default_rng(seed)
    shapes = config.module_shapes()

    def rows(width):
        return rng.random((config.num_layers, rank, width), np.float32).astype(jnp.bfloat16)

    return LoraWeights(
        name=f"bench{seed}",
        a={m: rows(shapes[m][0]) for m in MODULES},
        b={m: rows(shapes[m][1]) for m in MODULES},
        scales=dict.fromkeys(MODULES, 2.0),
    )


def measure_manager(
    config: ModelConfig,
    rank: int,
    adapters: int,
    steps: int,
    host_memory_kind: str | None,
    max_in_flight: int,
) -> dict:
    rows_per_page = 16
    pool = LoraPoolConfig.sized_for(
        adapters + 1,
        rank,
        rows_per_page=rows_per_page,
        max_slots=adapters,
        max_rank=max(rank, rows_per_page),
    )
    store = AdapterStore(
        config, pool, AdapterStoreConfig(dtype="bfloat16", host_memory_kind=host_memory_kind)
    )
    manager = AdapterManager(
        store, AdapterManagerConfig(load_workers=0, max_copy_bytes_in_flight=max_in_flight)
    )
    names = [f"a{i}" for i in range(adapters)]
    for i, name in enumerate(names):
        manager.register(name, random_adapter(config, rank, i))
    # Compile the copy path once (one adapter, then a full batch) and empty the pool.
    manager.acquire(names[0]).wait().release()
    manager.evict_all_unused()
    for h in [manager.acquire(n) for n in names]:
        h.wait().release()
    manager.evict_all_unused()

    cold = []
    for name in names:
        start = time.perf_counter()
        manager.acquire(name).wait().release()
        cold.append(time.perf_counter() - start)
    batched_runs = []
    for _ in range(3):
        manager.evict_all_unused()
        start = time.perf_counter()
        handles = [manager.acquire(n) for n in names]
        manager.poll()
        for h in handles:
            h.wait()
        batched_runs.append(time.perf_counter() - start)
        for h in handles:
            h.release()
    batched = statistics.median(batched_runs)
    nbytes = store.get(names[0]).nbytes

    # A stand-in decode step that reads the pools (so it is ordered after the scatters) and does
    # a few ms of matmuls; the engine syncs on every step's sampled tokens, so do we.
    weight = jnp.ones((config.hidden_size, config.hidden_size), jnp.bfloat16)

    @jax.jit
    def step(pools, x):
        for _ in range(32):
            x = jnp.tanh(x @ weight)
        return x + pools["embed"][0, 0, 0, :].astype(x.dtype)

    x = jnp.ones((256, config.hidden_size), jnp.bfloat16)
    jax.block_until_ready(step(manager.pools, x))

    def run_steps(copy_every: int) -> list[float]:
        manager.evict_all_unused()
        times, held, i = [], [], 0
        for s in range(steps):
            if copy_every and s % copy_every == 0:
                for h in held:
                    h.release()
                manager.evict_all_unused()
                held = [manager.acquire(names[i % adapters])]
                i += 1
            manager.poll()
            start = time.perf_counter()
            with manager.locked_pools() as pools:
                out = step(pools, x)
            out.block_until_ready()
            times.append(time.perf_counter() - start)
        for h in held:
            h.release()
        return times

    quiet, busy = run_steps(0), run_steps(2)
    stats = manager.stats()
    return {
        "model": config.name,
        "rank": rank,
        "adapter_bytes": nbytes,
        "host_memory_kind": host_memory_kind,
        "cold_acquire_to_ready_ms": [round(t * 1e3, 2) for t in cold],
        "cold_GBps_median": round(nbytes / statistics.median(cold) / 1e9, 2),
        f"batched_{adapters}_adapters_ms": round(batched * 1e3, 2),
        "batched_GBps": round(adapters * nbytes / batched / 1e9, 2),
        "step_ms_no_copies_median": round(statistics.median(quiet) * 1e3, 3),
        "step_ms_no_copies_max": round(max(quiet) * 1e3, 3),
        "step_ms_with_copies_median": round(statistics.median(busy) * 1e3, 3),
        "step_ms_with_copies_max": round(max(busy) * 1e3, 3),
        "transfer_batches": stats.transfer_batches,
        "scatters": stats.scatters,
        "bytes_copied": stats.bytes_copied,
    }


def write_sparse_peft_adapter(directory: str, config: ModelConfig, rank: int) -> int:
    """Writes a PEFT directory (rank on all 7 modules, bf16) whose safetensors data section is a
    sparse hole: the header and the file size are exactly those of a real adapter, so header-only
    validation does all its work, while 2,000 llama-2-7b-sized adapters cost no disk. Returns the
    file's logical size."""
    from jaxlora.formats.peft import TENSOR_PREFIX, _module_key

    shapes = config.module_shapes()
    header, offset = {}, 0
    for layer in range(config.num_layers):
        for module in MODULES:
            fan_in, fan_out = shapes[module]
            for kind, shape in (("A", [rank, fan_in]), ("B", [fan_out, rank])):
                nbytes = shape[0] * shape[1] * 2
                name = f"{TENSOR_PREFIX}{_module_key(layer, module)}.lora_{kind}.weight"
                header[name] = {
                    "dtype": "BF16",
                    "shape": shape,
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(MODULES),
                "use_rslora": False,
                "use_dora": False,
                "modules_to_save": None,
            },
            f,
        )
    return 8 + len(raw) + offset


def measure_registration(
    config: ModelConfig, rank: int, count: int, root: str | None = None
) -> dict:
    """Registers `count` PEFT directories of the model's full shape through AdapterStore
    .register_root (validation of every config and safetensors header, no weights read)."""
    pool = LoraPoolConfig.sized_for(1, rank, max_rank=max(rank, 16))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        start = time.perf_counter()
        file_bytes = 0
        for i in range(count):
            file_bytes = write_sparse_peft_adapter(
                os.path.join(tmp, f"adapter{i:05d}"), config, rank
            )
        write_seconds = time.perf_counter() - start

        def new_store():
            return AdapterStore(
                config, pool, AdapterStoreConfig(dtype="bfloat16", host_memory_kind=None)
            )

        store = new_store()
        start = time.perf_counter()
        report = store.register_root(tmp)
        seconds = time.perf_counter() - start
        if len(report.registered) != count:
            raise RuntimeError(f"registered {len(report.registered)} of {count} adapters")
        # Python heap kept per registered adapter, traced on a second store (tracemalloc slows
        # every allocation, so it stays out of the timing above).
        traced = new_store()
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        for name in report.registered[: min(count, 200)]:
            traced.register(name, os.path.join(tmp, name))
        after, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        entry = store.get(report.registered[0])
        return {
            "adapters": count,
            "rank": rank,
            "file_bytes_each": file_bytes,
            "write_s": round(write_seconds, 2),
            "register_s": round(seconds, 3),
            "register_ms_each": round(seconds / count * 1e3, 3),
            "registry_bytes_each": round((after - before) / min(count, 200)),
            "resident_host_bytes_each": entry.nbytes,
        }


def run(
    model: str = "llama-2-7b",
    rank: int = 16,
    adapters: int = 8,
    steps: int = 40,
    max_in_flight_mb: int = 1024,
    host_memory_kinds: tuple[str, ...] = ("pinned_host",),
    register_count: int = 2000,
) -> dict:
    """Every measurement of this module, as one JSON-able dict (see scripts/bench_adapters.py)."""
    config = get_model_preset(model)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "model": model,
        "rank": rank,
    }
    if not host_memory_kinds:
        raise ValueError("host_memory_kinds: expected at least one of numpy, pinned_host")
    for kind in host_memory_kinds:
        result[f"manager_{kind}"] = manager = measure_manager(
            config, rank, adapters, steps, None if kind == "numpy" else kind, max_in_flight_mb << 20
        )
    result["transfer"] = measure_transfers(manager["adapter_bytes"])
    if register_count:
        result["registration"] = measure_registration(config, rank, register_count)
    return result

"""Sizing the KV cache from the device's memory (vLLM's ``--gpu-memory-utilization``).

The server may fill ``utilization`` of each device's memory: the weights, the adapter page
pools, the working memory of a step and the KV cache. The KV cache gets what the other three
leave, in whole pages.

The device's memory is JAX's view of it (``Device.memory_stats()``): ``bytes_limit`` is what
JAX's allocator may hold, which is ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (0.75 unless set) of the
GPU's memory, and ``bytes_in_use`` what it holds now. ``build_state`` sets that variable to
the utilization before JAX starts its GPU backend (``reserve_device_memory``), so the
allocator may hold exactly the share asked for. Where the variable was set already, or the
backend had started, the GPU's memory is inferred from the limit and the fraction in effect,
and the share is capped at the limit.

The working memory of a step is an estimate, not a measurement: the largest activations of a
step of ``max_num_tokens`` tokens (f32, four live at once) or, where larger, a prefill step's
attention transients (the K and V gathered over max_model_len keys, XLA's scores;
``prefill_attention_bytes``) or, with tensor parallelism, a decode step's jnp attention (every
row's K and V gathered over the table and in float32; ``decode_attention_bytes``), the logits
and the sampler's sorted copies of them, and a fixed 2 GiB for what XLA and the kernels keep
beside them (the GEMM autotuner's buffers while a step compiles, cuBLAS workspaces, adapter
uploads in flight, allocator fragmentation). The server logs each device's peak once it is
warm (``describe_device_memory``): the measure to set the share by.

JAX's GPU allocator hands out each array as one contiguous block of its region, and loading the
weights leaves holes where their transients were freed: on an H100 at a share of 0.9 the
llama-2-7b weights left a hole of about 2 GiB below the free tail, and the V pool (25.4 GiB,
half the cache) no longer fitted although the free bytes summed to more (forty-first session,
docs/results/s41). So the K and V pools, with the adapter pools and the weights still to place,
must also fit in the largest free block the allocator reports (``largest_free_block_bytes``);
the smaller of the two rules sizes the cache, and the log says which one did.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.errors import ConfigError
from pallas_kernels import layout

log = logging.getLogger("jaxlora.server")

MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# JAX's allocator limit when the variable is unset (its documented default).
DEFAULT_MEMORY_FRACTION = 0.75
# What XLA and the kernels keep beside a step's own buffers (see the module docstring).
FIXED_WORKING_BYTES = 2 * 2**30
# Slack in the largest free block for the allocator's rounding of the arrays placed in it.
CONTIGUOUS_SLACK_BYTES = 64 * 2**20
# Live f32 activations of a step's widest layer part, and sorted copies of the logits.
LIVE_ACTIVATIONS = 4
LOGIT_COPIES = 8


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as JAX reports it: limit is what its allocator may hold
    (memory_stats' bytes_limit), in_use what it holds now, largest_free the largest
    contiguous block free in its region (None before the region exists: then everything not
    in use is one block)."""

    device: str
    limit: int
    in_use: int
    largest_free: int | None = None


def check_utilization(value, where: str = "gpu_memory_utilization") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 < float(value) <= 1.0
    ):
        raise ConfigError(f"{where}: expected a fraction in (0, 1], got {value!r}")


def memory_fraction_in_effect() -> float:
    """The share of a GPU JAX's allocator may hold (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
    text = os.environ.get(MEMORY_FRACTION_VARIABLE)
    if not text:
        return DEFAULT_MEMORY_FRACTION
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"environment variable {MEMORY_FRACTION_VARIABLE}={text!r}: expected a fraction "
            "in (0, 1]"
        )
    return fraction


def reserve_device_memory(utilization: float) -> None:
    """Lets JAX's allocator hold ``utilization`` of each GPU (vLLM's share) by setting
    XLA_PYTHON_CLIENT_MEM_FRACTION before the GPU backend starts. A variable set already is
    kept (a smaller share there caps the sizing at it, with a warning); once the backend has
    started its limit is fixed and the same cap applies."""
    check_utilization(utilization)
    from jax._src import xla_bridge

    if os.environ.get(MEMORY_FRACTION_VARIABLE) or xla_bridge.backends_are_initialized():
        fraction = memory_fraction_in_effect()
        if fraction < utilization:
            log.warning(
                "gpu_memory_utilization %s: JAX's allocator may hold only %s of the GPU (%s); "
                "the server stays within that",
                utilization,
                fraction,
                f"{MEMORY_FRACTION_VARIABLE} is set"
                if os.environ.get(MEMORY_FRACTION_VARIABLE)
                else "its backend started before the share could be set",
            )
        return
    os.environ[MEMORY_FRACTION_VARIABLE] = str(float(utilization))


def device_memory(devices) -> list[DeviceMemory]:
    """Each device's limit and bytes in use; ConfigError for a device that reports none
    (JAX's CPU backend, or the platform allocator)."""
    out = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            raise ConfigError(
                f"gpu_memory_utilization: device {device} reports no memory limit "
                f"(memory_stats: {stats!r}; JAX's CPU backend reports none); size the KV "
                "cache with --kv_cache_memory or --kv_pages instead"
            )
        # The allocator reserves its region at the first allocation; until then it reports
        # a largest free block of 0.
        region = int(stats.get("pool_bytes", 0))
        largest = stats.get("largest_free_block_bytes")
        out.append(
            DeviceMemory(
                device=str(device),
                limit=int(stats["bytes_limit"]),
                in_use=int(stats.get("bytes_in_use", 0)),
                largest_free=int(largest) if region and largest is not None else None,
            )
        )
    return out


def host_bytes_per_device(params, shards: int) -> int:
    """Bytes of the leaves of params not on a device yet (host arrays), on each of shards
    devices: they are not in bytes_in_use but will be once the engine places them."""
    total = sum(
        int(np.asarray(leaf).nbytes)
        for leaf in jax.tree.leaves(params)
        if not isinstance(leaf, jax.Array)
    )
    return -(-total // shards)


def adapter_pool_bytes(model: ModelConfig, pool: LoraPoolConfig, dtype, *, shards: int = 1) -> int:
    """Bytes of the adapter page pools on each device: every pool is (layers, pages, rows,
    width); tensor parallelism splits every width but the hidden size (jaxlora.sharding)."""
    widths = layout.pool_widths(
        model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    )
    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for axis, width in widths.items():
        per_device = width if axis == "embed" else -(-width // shards)
        total += model.num_layers * pool.pages_in(axis) * pool.rows_per_page * per_device
    return total * itemsize


def prefill_attention_bytes(
    model: ModelConfig,
    *,
    rows: int,
    chunk: int,
    max_model_len: int,
    key_block: int | None,
    itemsize: int,
    shards: int = 1,
) -> int:
    """The largest transients of one layer's prefill attention (jaxlora.model._cached_attention)
    on each device, for ``rows`` prompts of ``chunk`` tokens over a page table of
    ``max_model_len`` keys: the K and V gathered from the pools over the whole table (cuDNN's
    one pass reads every key of it, past ``key_block`` too), the mask and cuDNN's bias made of
    it, and XLA's float32 scores and probabilities over at most ``key_block`` keys (the blocked
    path's block; None: the whole table). An upper bound: which of the two runs depends on the
    backend, dtype and head width, and a cut table (RunnerConfig.prefill_context_buckets) reads
    fewer keys."""
    kv_heads = -(-model.num_kv_heads // shards)
    heads = -(-model.num_heads // shards)
    gathered = 2 * rows * max_model_len * kv_heads * model.head_dim * itemsize
    mask = rows * chunk * max_model_len * (1 + itemsize)
    scored = max_model_len if key_block is None else min(max_model_len, key_block)
    scores = 2 * rows * heads * chunk * scored * 4
    return gathered + mask + scores


def decode_attention_bytes(
    model: ModelConfig, *, rows: int, max_model_len: int, itemsize: int, shards: int = 1
) -> int:
    """The largest transients of one layer's decode attention on the jnp path
    (pallas_kernels.paged_attention.paged_attention_reference, which tensor-parallel steps run:
    jaxlora.engine.engine) on each device, for ``rows`` rows over a page table of
    ``max_model_len`` keys: every row's K and V gathered in the pool's dtype and again in
    float32, and the float32 scores and weights. (The Pallas kernel of a single device reads
    the pages in place.)"""
    kv_heads = -(-model.num_kv_heads // shards)
    heads = -(-model.num_heads // shards)
    gathered = 2 * rows * max_model_len * kv_heads * model.head_dim * (itemsize + 4)
    scores = 2 * rows * heads * max_model_len * 4
    return gathered + scores


def step_working_bytes(
    model: ModelConfig,
    *,
    max_num_tokens: int,
    max_batch: int,
    shards: int = 1,
    prefill_attention: int = 0,
    decode_attention: int = 0,
) -> int:
    """The estimate of a step's working memory on each device (see the module docstring);
    ``prefill_attention``: prefill_attention_bytes of the engine's prefill steps,
    ``decode_attention``: decode_attention_bytes of its decode steps where they run the jnp
    path (a layer's attention transients and its MLP's activations are not live at once: the
    largest counts)."""
    widest = (
        4 * model.hidden_size
        + (model.q_size + 2 * model.kv_size) // shards
        + 2 * model.intermediate_size // shards
    )
    activations = LIVE_ACTIVATIONS * max_num_tokens * widest * 4
    logits = (LOGIT_COPIES * max_batch + max_num_tokens) * model.vocab_size * 4
    return max(activations, prefill_attention, decode_attention) + logits + FIXED_WORKING_BYTES


@dataclasses.dataclass(frozen=True)
class KVBudget:
    """How a device's share was spent: every figure in bytes, on the tightest device."""

    device: str
    share: int  # utilization of the device's memory, capped at JAX's limit
    in_use: int  # held before the engine was built (the weights, when already placed)
    pending: int  # weights still on the host, to be placed
    adapter_pools: int
    working: int
    kv_cache: int  # what is left: the KV cache's bytes
    # The largest free block (None where unknown): the K and V pools, the adapter pools and
    # the weights to place must fit in it; bound_by_block where that, not the share, sized
    # the cache.
    largest_free: int | None = None
    bound_by_block: bool = False

    def describe(self) -> str:
        gib = 2**30
        text = (
            f"{self.device}: share {self.share / gib:.2f} GiB = in use {self.in_use / gib:.2f} "
            f"+ weights to place {self.pending / gib:.2f} + adapter pools "
            f"{self.adapter_pools / gib:.2f} + step working memory (estimate) "
            f"{self.working / gib:.2f} + KV cache {self.kv_cache / gib:.2f} GiB"
        )
        if self.bound_by_block:
            text += (
                f" (bound by the largest free block, {self.largest_free / gib:.2f} GiB of the "
                f"{(self.share - self.in_use) / gib:.2f} free: the K/V pools, adapter pools and "
                "weights to place must fit in one block; the rest is left to the steps)"
            )
        elif self.largest_free is not None:
            text += f" (largest free block {self.largest_free / gib:.2f} GiB)"
        return text


def kv_budget(
    utilization: float,
    memory: list[DeviceMemory],
    *,
    pending: int,
    adapter_pools: int,
    working: int,
) -> KVBudget:
    """The KV cache's bytes on each device: utilization of the device's memory (inferred from
    the allocator's limit and fraction, the share it may hold) less what is in use, the
    weights still to place, the adapter pools and the working memory, and no more than the
    largest free block holds beside the weights to place and the adapter pools (see the
    module docstring); the tightest device decides. ConfigError when nothing is left."""
    check_utilization(utilization)
    fraction = memory_fraction_in_effect()
    budgets = []
    for m in memory:
        share = min(int(utilization * m.limit / fraction), m.limit)
        left = share - m.in_use - pending - adapter_pools - working
        bound_by_block = False
        if m.largest_free is not None:
            contiguous = m.largest_free - pending - adapter_pools - CONTIGUOUS_SLACK_BYTES
            if contiguous < left:
                left, bound_by_block = contiguous, True
        budgets.append(
            KVBudget(
                m.device,
                share,
                m.in_use,
                pending,
                adapter_pools,
                working,
                left,
                m.largest_free,
                bound_by_block,
            )
        )
    tightest = min(budgets, key=lambda b: b.kv_cache)
    if tightest.kv_cache <= 0:
        raise ConfigError(
            f"gpu_memory_utilization {utilization}: leaves no memory for the KV cache "
            f"({tightest.describe()}); raise it, or lower --adapter_pool_pages, "
            "--max_num_tokens or --max_batch"
        )
    return tightest


MEMORY_REPORT_KINDS = (
    ("in_use", "bytes_in_use"),
    ("peak", "peak_bytes_in_use"),
    ("limit", "bytes_limit"),
)


def memory_report(devices) -> dict[tuple[str, str], int]:
    """{(device, kind): bytes} for kind in in_use, peak, limit, of the devices that report
    their memory (JAX's CPU backend does not): /metrics' jaxlora_device_memory_bytes."""
    report = {}
    for device in devices:
        stats = device.memory_stats() or {}
        for kind, key in MEMORY_REPORT_KINDS:
            if key in stats:
                report[(str(device), kind)] = int(stats[key])
    return report


def describe_device_memory(devices) -> str:
    """Each device's bytes in use, peak and limit, for the log ("" where none reports)."""
    gib = 2**30
    report = memory_report(devices)
    parts = []
    for device in dict.fromkeys(device for device, _ in report):
        if (device, "limit") in report:
            parts.append(
                f"{device}: in use {report.get((device, 'in_use'), 0) / gib:.2f} GiB, peak "
                f"{report.get((device, 'peak'), 0) / gib:.2f} GiB of "
                f"{report[(device, 'limit')] / gib:.2f} GiB"
            )
    return "; ".join(parts)

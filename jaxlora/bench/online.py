"""Online serving on S-LoRA's synthetic trace: requests arrive on their trace times while the
engine runs (in this thread: submit what has arrived, run one iteration, repeat); adapters start
in host memory (the pool is emptied before each trace) and are paged in on demand.

With ``prefix_len`` every request starts with its adapter's system prompt, and each trace can be
served with prefix caching off and on (``prefix_caching``, on one compiled engine; the cache
starts empty each time). Each row then counts the prompt tokens computed and taken from the
cache, and the trace's floor: its decode steps' bytes at the copy bandwidth plus the FLOPs of
the prompt positions it computed at the matmul rate (both measured in the same run)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time

from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.errors import ConfigError
from jaxlora.heap import GcRecorder, frozen_heap
from jaxlora.sampling import SamplingParams

from . import roofline
from .engine_setup import BenchEngine
from .gpu_monitor import GpuMonitor, describe
from .serving_client import latency_fields
from .timing import CompileCounter, host_ms_since, host_snapshot
from .workloads import TraceConfig, synthetic_trace, trace_prompt

log = logging.getLogger("jaxlora.bench")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """adapter_counts: one trace per count; rate: requests per second; duration_s: arrivals
    span; drain_timeout_s: how long after the last arrival unfinished requests may run before
    they are cancelled (and count as missing the SLO); slo_s: the first-token objective;
    max_batch: decode rows per step; max_slots: distinct adapters one step may use (vLLM's
    --max-loras; None: max_batch, every row its own adapter); max_skips: how often a waiting
    request may be overtaken (EngineConfig.max_skips), e.g. by requests for adapters already in
    the step while it waits for a slot; resident_adapters: adapters the GPU pool holds at once;
    kv_pages: KV cache pages of 16 tokens; prefix_len: tokens of each adapter's system prompt
    that its requests start with (TraceConfig.prefix_len; 0: none); prefix_caching: each trace
    is served once per mode listed (False: off, True: on)."""

    adapter_counts: tuple[int, ...] = (5, 100, 1000, 2000)
    rate: float = 4.0
    duration_s: float = 60.0
    drain_timeout_s: float = 60.0
    alpha: float = 1.0
    cv: float = 1.0
    popularity: str = "slora"
    min_len: int = 8
    max_len: int = 512
    prefix_len: int = 0
    prefix_caching: tuple[bool, ...] = (False,)
    slo_s: float = 6.0
    rank: int = 16
    max_batch: int = 64
    max_slots: int | None = None
    max_skips: int = EngineConfig.max_skips
    prefill_chunk: int = 256
    prefill_rows: int = 4
    resident_adapters: int = 96
    kv_pages: int = 3000
    impl: str = "auto"  # RunnerConfig.impl
    layer_loop: str = "scan"  # RunnerConfig.layer_loop
    fuse_projections: bool = True  # RunnerConfig.fuse_projections
    projection_kernel: str = "auto"  # RunnerConfig.projection_kernel
    kv_cache_dtype: str = "auto"  # KVCacheConfig.cache_dtype
    # True: every model step is waited for and timed (decode_step_ms_median), which makes the
    # device wait for the host as synchronous scheduling would; False: the engine runs as it
    # serves (async scheduling) and the steps are only counted.
    time_steps: bool = False
    # Each trace is served with the objects alive before it frozen (jaxlora.heap.frozen_heap),
    # as serve.py serves once warm.
    freeze_heap: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.adapter_counts or any(
            not isinstance(n, int) or n < 1 for n in self.adapter_counts
        ):
            raise ConfigError(
                f"online benchmark adapter_counts: expected positive ints, got "
                f"{self.adapter_counts!r}"
            )
        for field in (
            "max_batch",
            "prefill_chunk",
            "prefill_rows",
            "resident_adapters",
            "kv_pages",
            "rank",
            "max_skips",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"online benchmark field {field!r}: expected an int >= 1, got {value!r}"
                )
        if self.max_slots is not None and not (
            isinstance(self.max_slots, int) and 1 <= self.max_slots <= self.max_batch
        ):
            raise ConfigError(
                f"online benchmark field 'max_slots': expected an int in [1, max_batch = "
                f"{self.max_batch}] or None, got {self.max_slots!r}"
            )
        if self.resident_adapters < self.max_batch:
            raise ConfigError(
                f"online benchmark: resident_adapters ({self.resident_adapters}) "
                f"must be >= max_batch ({self.max_batch}): a full step of "
                "distinct adapters needs them all resident"
            )
        modes = self.prefix_caching
        if (
            not isinstance(modes, tuple)
            or not modes
            or any(not isinstance(m, bool) for m in modes)
            or len(set(modes)) != len(modes)
        ):
            raise ConfigError(
                "online benchmark field 'prefix_caching': expected a tuple of distinct bools "
                f"(False: off, True: on), got {modes!r}"
            )
        self.trace(self.adapter_counts[0])  # validates the trace fields

    def trace(self, num_adapters: int) -> TraceConfig:
        return TraceConfig(
            num_adapters=num_adapters,
            rate=self.rate,
            duration_s=self.duration_s,
            alpha=self.alpha,
            cv=self.cv,
            popularity=self.popularity,
            min_len=self.min_len,
            max_len=self.max_len,
            prefix_len=self.prefix_len,
            seed=self.seed,
        )

    @property
    def step_slots(self) -> int:
        return self.max_batch if self.max_slots is None else self.max_slots

    def engine_config(self) -> EngineConfig:
        rows_per_page = min(16, self.rank)
        return EngineConfig(
            kv=KVCacheConfig(
                page_size=16,
                num_pages=self.kv_pages,
                max_model_len=self.prefix_len + 2 * self.max_len,
                cache_dtype=self.kv_cache_dtype,
                prefix_caching=self.prefix_caching[0],
            ),
            runner=RunnerConfig(
                max_batch=self.max_batch,
                prefill_chunk=self.prefill_chunk,
                max_prefill_rows=self.prefill_rows,
                impl=self.impl,
                layer_loop=self.layer_loop,
                fuse_projections=self.fuse_projections,
                projection_kernel=self.projection_kernel,
            ),
            lora_pool=LoraPoolConfig.sized_for(
                self.resident_adapters,
                self.rank,
                rows_per_page=rows_per_page,
                max_slots=self.step_slots,
            ),
            max_num_tokens=self.prefill_rows * self.prefill_chunk + self.max_batch,
            max_waiting=1 << 20,
            max_skips=self.max_skips,
        )


def run_trace(
    bench: BenchEngine,
    config: OnlineConfig,
    num_adapters: int,
    *,
    prefix_caching: bool = False,
    copy_gbps: float | None = None,
    matmul_tflops: float | None = None,
) -> dict:
    """One trace served; copy_gbps / matmul_tflops: the rates of the row's floor (None: no
    floor)."""
    engine, manager = bench.engine, bench.manager
    model = engine.config
    trace = synthetic_trace(config.trace(num_adapters))
    names = bench.adapters.ensure([r.adapter for r in trace])
    manager.evict_all_unused()
    engine.set_prefix_caching(prefix_caching)  # (and an empty cache either way)
    before = manager.stats()
    preemptions_before = engine.stats.preemptions
    prompt_tokens_before = engine.stats.prompt_tokens
    cached_before = engine.stats.prefix_cached_tokens
    host_before = host_snapshot(engine.stats)
    bench.timer.take()
    bench.timer.blocking = config.time_steps
    submitted = []
    steps = queued_steps = waiting_total = 0
    with (
        frozen_heap(config.freeze_heap),
        CompileCounter() as compiles,
        GcRecorder() as collections,
        contextlib.ExitStack() as restore,
    ):
        restore.callback(setattr, bench.timer, "blocking", True)
        origin = time.monotonic()
        next_index = 0
        give_up = origin + config.duration_s + config.drain_timeout_s
        while next_index < len(trace) or engine.has_work():
            now = time.monotonic()
            while next_index < len(trace) and origin + trace[next_index].arrival_s <= now:
                item = trace[next_index]
                sampling = SamplingParams(
                    temperature=0.0, max_tokens=item.output_len, ignore_eos=True
                )
                request = engine.submit(
                    trace_prompt(
                        item, model.vocab_size, seed=config.seed, prefix_len=config.prefix_len
                    ),
                    sampling,
                    adapter=names[next_index],
                    stream=False,
                )
                submitted.append((item, request))
                next_index += 1
            if now > give_up:
                for _, request in submitted:
                    if not request.finished:
                        engine.cancel(request.request_id)
                engine.run_until_idle()
                break
            if engine.has_work():
                engine.step()
                # Requests still waiting after a step: the load is at the engine's capacity
                # (rows, KV pages or adapter slots all taken); with none, the served rate just
                # follows the offered one.
                steps += 1
                waiting = engine.num_waiting
                queued_steps += waiting > 0
                waiting_total += waiting
            elif next_index < len(trace):
                time.sleep(max(0.0, min(0.005, origin + trace[next_index].arrival_s - now)))
        end = time.monotonic()
    host, host_cpu = host_ms_since(engine.stats, host_before, steps)
    after = manager.stats()
    records = bench.timer.take()
    done = [
        (item, r)
        for item, r in submitted
        if r.finished and r.error is None and len(r.output_ids) == item.output_len
    ]
    ttft = [r.first_token_time - (origin + item.arrival_s) for item, r in done]
    tpot = [
        (r.finish_time - r.first_token_time) / (len(r.output_ids) - 1)
        for _, r in done
        if len(r.output_ids) > 1
    ]
    latency = [r.finish_time - (origin + item.arrival_s) for item, r in done]
    out_tokens = sum(len(r.output_ids) for _, r in done)
    elapsed = (max(r.finish_time for _, r in done) - origin) if done else end - origin
    decode = [r for r in records if r.mode == "decode"]
    timed = [r.seconds for r in decode if not math.isnan(r.seconds)]
    # Every step reads each distinct adapter it uses once (the roofline's count): the adapter
    # bytes the trace must move through device memory, whatever the kernels.
    adapter_bytes_read = sum(
        roofline.adapter_bytes(model, bench.itemsize, ranks)
        for r in records
        for ranks in r.slot_ranks
    )
    last_arrival = trace[-1].arrival_s if trace else 0.0
    prompt_tokens = sum(config.prefix_len + item.prompt_len for item, _ in submitted)
    cached = engine.stats.prefix_cached_tokens - cached_before
    spans = [  # (each request's positions past those it found computed at its admission)
        (request.num_cached_tokens, config.prefix_len + item.prompt_len)
        for item, request in submitted
        if request.admitted_time is not None
    ]
    floor = trace_floor(bench, records, spans, copy_gbps, matmul_tflops)
    row = {
        "num_adapters": num_adapters,
        "prefix_len": config.prefix_len,
        "prefix_caching": prefix_caching,
        "requests": len(trace),
        "finished": len(done),
        "unfinished": len(trace) - len(done),
        "distinct_adapters": len(set(names)),
        "elapsed_s": elapsed,
        "throughput_rps": len(done) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "offered_rps": len(trace) / last_arrival if last_arrival > 0 else float("nan"),
        # Share of engine steps after which requests were still waiting, and their mean number:
        # near 0, the trace ran below capacity.
        "queued_step_share": queued_steps / steps if steps else 0.0,
        "waiting_mean": waiting_total / steps if steps else 0.0,
        **latency_fields(ttft, tpot, latency, requests=len(trace), slo_s=config.slo_s),
        "adapter_misses": after.misses - before.misses,
        "adapter_evictions": after.evictions - before.evictions,
        "adapter_GB_copied": (after.bytes_copied - before.bytes_copied) / 1e9,
        "adapter_GB_read": adapter_bytes_read / 1e9,
        "decode_steps": len(decode),
        "decode_step_ms_median": statistics.median(timed) * 1e3 if timed else float("nan"),
        "steps_timed": config.time_steps,
        "decode_rows_mean": statistics.fmean(r.rows for r in decode) if decode else 0.0,
        "adapters_per_decode_step_mean": statistics.fmean(len(r.slot_ranks) for r in decode)
        if decode
        else 0.0,
        "adapters_per_step_max": max((len(r.slot_ranks) for r in records), default=0),
        "prefill_steps": sum(r.mode == "prefill" for r in records),
        # Prompt tokens of the submitted requests (system prompts included); those the prefill
        # steps computed (recomputations after a preemption included; a prompt's last token
        # left alone by its chunks is fed in a decode step, not counted) and those whose K/V
        # came from the prefix cache at admission.
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_computed": engine.stats.prompt_tokens - prompt_tokens_before,
        "prompt_tokens_cached": cached,
        "cached_share": cached / prompt_tokens if prompt_tokens else 0.0,
        **floor,
        "preemptions": engine.stats.preemptions - preemptions_before,
        "compilations_while_timed": compiles.count,
        # The garbage collections the trace paid for (jaxlora.heap.GcRecorder.summary).
        "gc": collections.summary(),
        # Host ms per engine iteration by phase (EngineStats.host_seconds): "wait" is the time
        # blocked on the device, the rest the host's own work ("schedule" includes polling the
        # adapter pool and starting adapter loads at admission).
        "host_ms_per_step": host,
        # The engine thread's CPU ms in the same phases: where it is far below the wall time,
        # the phase was blocked (on the device, or on the interpreter lock).
        "host_cpu_ms_per_step": host_cpu,
    }
    log.info(
        "online n=%d: %.2f req/s, %.0f tok/s, ttft p50 %.2f s p99 %.2f s, SLO %.1f%%, "
        "%d misses; gc %d full, longest %.1f ms",
        num_adapters,
        row["throughput_rps"],
        row["output_tokens_per_s"],
        row["ttft_p50_s"],
        row["ttft_p99_s"],
        100 * row["slo_attainment"],
        row["adapter_misses"],
        row["gc"]["collections"]["2"],
        row["gc"]["ms_max"],
    )
    if config.prefix_len or prefix_caching:
        log.info(
            "online n=%d, %d-token system prompts, prefix caching %s: %d of %d prompt tokens "
            "computed, %d cached (%.1f%%)",
            num_adapters,
            config.prefix_len,
            "on" if prefix_caching else "off",
            row["prompt_tokens_computed"],
            prompt_tokens,
            cached,
            100 * row["cached_share"],
        )
    return row


def trace_floor(bench, records, spans, copy_gbps, matmul_tflops) -> dict:
    """A trace's device-time floor (see the module docstring): its decode steps' bytes at
    copy_gbps, the prompt positions [start, end) of ``spans`` (each request's past the tokens
    it found computed) at matmul_tflops; {} without both rates."""
    if not copy_gbps or not matmul_tflops:
        return {}
    model = bench.engine.config
    decode_s = sum(
        roofline.decode_step_bytes(
            model,
            bench.itemsize,
            seq_lens=r.seq_lens,
            adapter_ranks=r.slot_ranks,
            kv_itemsize=bench.kv_itemsize,
            kv_tokens=r.kv_tokens,  # (rows sharing a cached prefix read its pages once)
        ).seconds(copy_gbps)
        for r in records
        if r.mode == "decode"
    )
    prefill_s = roofline.prefill_flops(model, spans) / (matmul_tflops * 1e12)
    return {"decode_floor_s": decode_s, "prefill_floor_s": prefill_s}


def monitored(monitor: GpuMonitor, serve) -> dict:
    """serve()'s row, with what the GPU ran at meanwhile (``row["gpu"]``: GpuMonitor's
    summary; None without nvidia-smi)."""
    start = time.monotonic()
    row = serve()
    row["gpu"] = monitor.summary(start, time.monotonic())
    return row


def run_online(
    bench: BenchEngine,
    config: OnlineConfig,
    *,
    on_row=None,
    copy_gbps: float | None = None,
    matmul_tflops: float | None = None,
) -> dict:
    """Every trace of config.adapter_counts, each once per config.prefix_caching mode."""
    rows = []
    with GpuMonitor() as monitor:
        for count in config.adapter_counts:
            for caching in config.prefix_caching:
                row = monitored(
                    monitor,
                    lambda count=count, caching=caching: run_trace(
                        bench,
                        config,
                        count,
                        prefix_caching=caching,
                        copy_gbps=copy_gbps,
                        matmul_tflops=matmul_tflops,
                    ),
                )
                if row["gpu"]:
                    log.info("online %d adapters %s", count, describe(row["gpu"]))
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return {
        "config": dataclasses.asdict(config),
        "projection_kernel_used": bench.projection_kernel_used,
        "runner": bench.runner_config,
        "rows": rows,
    }

"""Offline throughput: a fixed batch of requests (equal prompts, greedy, EOS ignored) per batch
size and adapter workload, run to completion by the engine; each decode step timed and compared
with its roofline (jaxlora/bench/roofline.py) at the copy bandwidth measured in the same run."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import statistics
import time

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.errors import ConfigError
from jaxlora.heap import GcRecorder, frozen_heap
from jaxlora.sampling import SamplingParams

from . import profile, roofline
from .engine_setup import BenchEngine, preload
from .gpu_monitor import GpuMonitor, describe
from .timing import CompileCounter, StepRecord, host_ms_since, host_snapshot
from .workloads import WORKLOADS, assign_adapters, offline_prompts

log = logging.getLogger("jaxlora.bench")

KV_PAGE_SIZE = 16
PROFILE_AFTER_TOKENS = 4  # every request past its prefill and first decode steps


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """prefill_rows: prompts prefilled together (prefill shapes: 1 and prefill_rows rows);
    skewed_adapters: the adapters the skewed workload draws from (Zipf, alpha 1)."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128)
    workloads: tuple[str, ...] = WORKLOADS
    prompt_len: int = 256
    output_len: int = 128
    rank: int = 16
    skewed_adapters: int = 1000
    prefill_rows: int = 8
    impl: str = "auto"  # RunnerConfig.impl
    layer_loop: str = "scan"  # RunnerConfig.layer_loop
    fuse_projections: bool = True  # RunnerConfig.fuse_projections
    projection_kernel: str = "auto"  # RunnerConfig.projection_kernel
    kv_cache_dtype: str = "auto"  # KVCacheConfig.cache_dtype
    # Engine iterations of every row traced with the JAX profiler once the whole batch decodes
    # (jaxlora/bench/profile.py); 0: none. Traced iterations are left out of the step times.
    profile_steps: int = 0
    # After the timed pass (every step waited for and timed), each row is served again once per
    # mode here, untimed: "async" / "sync" scheduling (EngineConfig.async_scheduling). The first
    # gives the row's output tokens/s; () keeps the timed pass's.
    free_running: tuple[str, ...] = ("async", "sync")
    # Each row is served with the objects alive before it frozen (jaxlora.heap.frozen_heap), as
    # serve.py serves once warm: a full garbage collection then scans only what the row creates.
    freeze_heap: bool = True
    seed: int = 0
    # The engine's context length (its page tables' width: a prefill step's attention reads
    # the table RunnerConfig.prefill_context_buckets cuts it to); None: prompt_len + output_len.
    # The KV pages stay those the requests fill. A server's default is 4,096.
    max_model_len: int | None = None

    def __post_init__(self):
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(
                f"offline benchmark batch_sizes: expected positive ints, got {self.batch_sizes!r}"
            )
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ConfigError(
                f"offline benchmark workloads {list(self.workloads)}: expected a "
                f"non-empty subset of {list(WORKLOADS)}"
            )
        if any(mode not in ("async", "sync") for mode in self.free_running):
            raise ConfigError(
                f"offline benchmark field 'free_running': expected modes 'async' "
                f"or 'sync', got {self.free_running!r}"
            )
        if not isinstance(self.profile_steps, int) or self.profile_steps < 0:
            raise ConfigError(
                f"offline benchmark field 'profile_steps': expected an int >= 0, "
                f"got {self.profile_steps!r}"
            )
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int)
            or self.max_model_len < self.prompt_len + self.output_len
        ):
            raise ConfigError(
                f"offline benchmark field 'max_model_len': expected None or an int >= "
                f"prompt_len + output_len ({self.prompt_len + self.output_len}), "
                f"got {self.max_model_len!r}"
            )
        for field in ("prompt_len", "output_len", "rank", "skewed_adapters", "prefill_rows"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"offline benchmark field {field!r}: expected an int >= 1, got {value!r}"
                )
        if self.output_len < 2:
            raise ConfigError(
                f"offline benchmark output_len {self.output_len}: expected >= 2 "
                "(the first token comes from the prefill; decode steps follow)"
            )

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    def engine_config(self) -> EngineConfig:
        """Every request of the largest batch resident at once: KV pages for all of them, pool
        pages and step slots for one adapter per request."""
        max_len = self.prompt_len + self.output_len
        rows_per_page = min(16, self.rank)
        prefill_rows = min(self.prefill_rows, self.max_batch)
        return EngineConfig(
            kv=KVCacheConfig(
                page_size=KV_PAGE_SIZE,
                max_model_len=self.max_model_len or max_len,
                num_pages=self.max_batch * -(-max_len // KV_PAGE_SIZE),
                cache_dtype=self.kv_cache_dtype,
            ),
            runner=RunnerConfig(
                max_batch=self.max_batch,
                prefill_chunk=self.prompt_len,
                max_prefill_rows=prefill_rows,
                impl=self.impl,
                layer_loop=self.layer_loop,
                fuse_projections=self.fuse_projections,
                projection_kernel=self.projection_kernel,
                decode_buckets=tuple(sorted(set(self.batch_sizes))),
                prefill_buckets=tuple(sorted({1, prefill_rows})),
            ),
            lora_pool=LoraPoolConfig.sized_for(
                self.max_batch, self.rank, rows_per_page=rows_per_page
            ),
            max_num_tokens=prefill_rows * self.prompt_len + self.max_batch,
        )


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarize_decode(
    records: list[StepRecord],
    batch: int,
    model: ModelConfig,
    itemsize: int,
    copy_gbps: float,
    *,
    kv_itemsize: int | None = None,
) -> dict:
    """Median time and roofline of the decode steps that ran the whole batch (steps of a
    partial batch, while prompts are still being prefilled, are counted but not summarized);
    itemsize: of the weights and adapters, kv_itemsize: of the KV cache (None: itemsize)."""
    decode = [r for r in records if r.mode == "decode"]
    full = [r for r in decode if r.rows == batch]
    prefill = [r.seconds for r in records if r.mode == "prefill"]
    floors = [
        roofline.decode_step_bytes(
            model,
            itemsize,
            seq_lens=r.seq_lens,
            adapter_ranks=r.slot_ranks,
            kv_itemsize=kv_itemsize,
        )
        for r in full
    ]
    step_s = _median([r.seconds for r in full])
    floor_s = _median([f.seconds(copy_gbps) for f in floors])
    mid = sorted(floors, key=lambda f: f.total)[len(floors) // 2] if floors else None
    return {
        "decode_steps": len(decode),
        "full_batch_decode_steps": len(full),
        "decode_step_ms": step_s * 1e3,
        "roofline_ms": floor_s * 1e3,
        "roofline_ratio": step_s / floor_s if full else float("nan"),
        "bytes_weights_MB": mid.weights / 1e6 if mid else float("nan"),
        "bytes_kv_MB": mid.kv_read / 1e6 if mid else float("nan"),
        "bytes_adapters_MB": mid.adapters / 1e6 if mid else float("nan"),
        "distinct_adapters_per_step": _median([len(r.slot_ranks) for r in full]),
        "prefill_steps": len(prefill),
        "prefill_s": sum(prefill),
        # (each timed prefill step synchronized: what --prefill_attention and the prefill
        # kernels change)
        "prefill_step_ms": _median(prefill) * 1e3,
    }


def run_row(
    bench: BenchEngine,
    config: OfflineConfig,
    batch: int,
    workload: str,
    copy_gbps: float,
    monitor: GpuMonitor | None = None,
) -> dict:
    """The row's requests served once with every model step timed (the step times, the
    roofline), then once per ``config.free_running`` scheduling mode untimed (tokens/s)."""
    indices = assign_adapters(
        workload, batch, seed=config.seed + batch, skewed_adapters=config.skewed_adapters
    )
    names = _names(bench, indices)
    load_s = preload(bench, names)
    with frozen_heap(config.freeze_heap):
        return _run_row(bench, config, batch, workload, names, load_s, copy_gbps, monitor)


def _run_row(bench, config, batch, workload, names, load_s, copy_gbps, monitor) -> dict:
    engine = bench.engine
    model = engine.config
    bench.timer.take()
    timed = _serve(
        bench, config, batch, workload, names, profile_steps=config.profile_steps, monitor=monitor
    )
    records = bench.timer.take()
    wall = timed["wall_s"]
    if timed["profiled_records"]:
        # The traced iterations count at the untraced median step time, not the profiler's.
        typical = _median([r.seconds for r in records if r.mode == "decode"])
        wall -= timed["profile_s"] - len(timed["profiled_records"]) * typical
    tokens = timed["output_tokens"]
    row = {
        "batch": batch,
        "workload": workload,
        "distinct_adapters": len({n for n in names if n is not None}),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "output_tokens_per_s_timed": tokens / wall,
        "engine_iterations": len(timed["iterations"]),
        "iteration_ms_median": _median(timed["iterations"]) * 1e3,
        "iteration_ms_max": timed["iteration_ms_max"],
        "outside_iterations_ms": timed["outside_iterations_ms"],
        "gc": timed["gc"],
        "adapter_preload_s": load_s,
        "compilations_while_timed": timed["compilations"],
        # Greedy tokens of the row's requests: the same seed and prompts give the same digest
        # under any kernel configuration that computes the same function, so two runs' rows
        # (an A/B of kernels, on the GPU) can be compared for tokens as well as for speed.
        "output_digest": output_digest(timed["output_ids"]),
        "output_head": [ids[:OUTPUT_HEAD_TOKENS] for ids in timed["output_ids"][:4]],
        # What the GPU ran at while the pass ran (GpuMonitor; None without nvidia-smi).
        "gpu": timed["gpu"],
    }
    row.update(
        summarize_decode(
            records, batch, model, bench.itemsize, copy_gbps, kv_itemsize=bench.kv_itemsize
        )
    )
    if timed["step_profile"]:
        row["profile"] = {
            **timed["step_profile"],
            "profiled_step_records_ms": [r.seconds * 1e3 for r in timed["profiled_records"]],
            "gpu": timed["gpu_traced"],
        }
        log.info("%s", profile.format_breakdown(f"batch={batch} {workload}", timed["step_profile"]))
    if config.free_running:
        row["free_running"] = {}
        bench.timer.enabled = False
        try:
            for mode in config.free_running:
                engine.async_scheduling = mode == "async"
                free = _serve(
                    bench, config, batch, workload, names, profile_steps=0, monitor=monitor
                )
                row["free_running"][mode] = {
                    "wall_s": free["wall_s"],
                    "output_tokens_per_s": free["output_tokens"] / free["wall_s"],
                    "iteration_ms_median": _median(free["iterations"]) * 1e3,
                    "iteration_ms_max": free["iteration_ms_max"],
                    "outside_iterations_ms": free["outside_iterations_ms"],
                    "gc": free["gc"],
                    "engine_iterations": len(free["iterations"]),
                    "compilations_while_timed": free["compilations"],
                    "host_ms_per_iteration": free["host_ms_per_iteration"],
                    "host_cpu_ms_per_iteration": free["host_cpu_ms_per_iteration"],
                    "host_ms_decode_median": free["host_ms_decode_median"],
                    # Scheduling must not change greedy tokens.
                    "same_tokens_as_timed": free["output_ids"] == timed["output_ids"],
                    "gpu": free["gpu"],
                }
                log.info(
                    "offline batch=%d %-9s %s: iteration %.2f ms (longest %.1f, %.1f ms "
                    "outside; gc %d full, longest %.1f ms); decode iterations' host ms %s %s",
                    batch,
                    workload,
                    mode,
                    row["free_running"][mode]["iteration_ms_median"],
                    free["iteration_ms_max"],
                    free["outside_iterations_ms"],
                    free["gc"]["collections"]["2"],
                    free["gc"]["ms_max"],
                    " ".join(f"{k}={v:.2f}" for k, v in free["host_ms_decode_median"].items()),
                    describe(free["gpu"]),
                )
            if config.profile_steps and "async" in config.free_running:
                # The same requests once more with async scheduling and a few iterations traced
                # (steps not waited for): the device's busy and idle time as the engine serves.
                engine.async_scheduling = True
                free = _serve(
                    bench,
                    config,
                    batch,
                    workload,
                    names,
                    profile_steps=config.profile_steps,
                    monitor=monitor,
                )
                if free["step_profile"]:
                    row["profile_async"] = {**free["step_profile"], "gpu": free["gpu_traced"]}
                    log.info(
                        "%s %s",
                        profile.format_breakdown(
                            f"batch={batch} {workload} async", free["step_profile"]
                        ),
                        describe(free["gpu_traced"]),
                    )
        finally:
            bench.timer.enabled = True
            engine.async_scheduling = engine.engine_config.async_scheduling
        # The headline: the first free-running mode (the engine as it serves), not the pass
        # that waited for every step to time it.
        first = row["free_running"][config.free_running[0]]
        row.update(wall_s=first["wall_s"], output_tokens_per_s=first["output_tokens_per_s"])
    log.info(
        "offline batch=%d %-9s %8.1f tok/s  step %.2f ms  roofline %.2f ms  (x%.2f)  "
        "prefill %.2f ms a step  %s",
        batch,
        workload,
        row["output_tokens_per_s"],
        row["decode_step_ms"],
        row["roofline_ms"],
        row["roofline_ratio"],
        row["prefill_step_ms"],
        describe(row["gpu"]),
    )
    return row


def _serve(
    bench: BenchEngine,
    config: OfflineConfig,
    batch: int,
    workload: str,
    names: list[str | None],
    *,
    profile_steps: int,
    monitor: GpuMonitor | None = None,
) -> dict:
    """Serves the row's requests to the end; fails if one did not produce every token. With
    ``monitor``: the GPU's clocks over the pass ("gpu") and over its traced iterations."""
    engine = bench.engine
    prompts = offline_prompts(batch, config.prompt_len, engine.config.vocab_size, seed=config.seed)
    sampling = SamplingParams(temperature=0.0, max_tokens=config.output_len, ignore_eos=True)
    iterations, profiled_records, step_profile, profile_s = [], [], None, 0.0
    stats = engine.stats
    host_before = host_snapshot(stats)
    decode_host = []  # each decode-only iteration's host ms by phase
    traced_window = None
    with CompileCounter() as compiles, GcRecorder() as collections:
        start, start_monotonic = time.perf_counter(), time.monotonic()
        requests = [
            engine.submit(list(map(int, p)), sampling, adapter=n, stream=False)
            for p, n in zip(prompts, names, strict=True)
        ]
        while engine.has_work():
            if (
                profile_steps
                and step_profile is None
                and config.output_len > PROFILE_AFTER_TOKENS + profile_steps
                and all(len(r.output_ids) >= PROFILE_AFTER_TOKENS for r in requests)
            ):
                kept = bench.timer.take()
                t, t_monotonic = time.perf_counter(), time.monotonic()
                step_profile = profile.profile_iterations(engine.step, profile_steps) or {}
                profile_s = time.perf_counter() - t
                traced_window = (t_monotonic, time.monotonic())
                profiled_records = bench.timer.take()
                bench.timer.records = kept
                continue
            before, prefills = host_snapshot(stats), stats.prefill_steps
            t = time.perf_counter()
            engine.step()
            iterations.append(time.perf_counter() - t)
            if stats.prefill_steps == prefills:
                decode_host.append(host_ms_since(stats, before, 1)[0])
        wall = time.perf_counter() - start
        window = (start_monotonic, time.monotonic())
    host, host_cpu = host_ms_since(stats, host_before, len(iterations))
    failed = [r for r in requests if r.error or len(r.output_ids) != config.output_len]
    if failed:
        raise RuntimeError(
            f"offline row batch={batch} workload={workload}: "
            f"{len(failed)} requests did not produce {config.output_len} tokens "
            f"(first: {failed[0].finish_reason} {failed[0].error})"
        )
    return {
        "wall_s": wall,
        "iterations": iterations,
        "iteration_ms_max": max(iterations, default=0.0) * 1e3,
        # The host's time between iterations (submitting the requests, the loop itself; and
        # the profiler's iterations where traced): a stall here delays every request too.
        "outside_iterations_ms": (wall - sum(iterations)) * 1e3,
        # The garbage collections the pass paid for (jaxlora.heap.GcRecorder.summary).
        "gc": collections.summary(),
        "compilations": compiles.count,
        "output_tokens": sum(len(r.output_ids) for r in requests),
        "output_ids": [list(map(int, r.output_ids)) for r in requests],
        "step_profile": step_profile,
        "profiled_records": profiled_records,
        "profile_s": profile_s,
        "gpu": monitor.summary(*window) if monitor is not None else None,
        "gpu_traced": (
            monitor.summary(*traced_window)
            if monitor is not None and traced_window is not None
            else None
        ),
        # Host ms per iteration by phase (EngineStats.host_seconds); with the profiler's
        # iterations included, so read them in a pass without --profile_steps.
        "host_ms_per_iteration": host,
        # The engine thread's CPU ms in the same phases (wall far above it: blocked).
        "host_cpu_ms_per_iteration": host_cpu,
        # The median of each phase over the iterations that ran decode steps only: with async
        # scheduling, "wait" near 0 there means the GPU had run out of queued work.
        "host_ms_decode_median": {
            phase: _median([h.get(phase, 0.0) for h in decode_host]) for phase in host
        },
    }


OUTPUT_HEAD_TOKENS = 16  # tokens of the first requests kept in a row, beside the digest


def output_digest(output_ids: list[list[int]]) -> str:
    """A short hash of every request's tokens, in request order."""
    text = ";".join(",".join(map(str, ids)) for ids in output_ids)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _names(bench: BenchEngine, indices: list[int | None]) -> list[str | None]:
    present = [i for i in indices if i is not None]
    named = dict(zip(present, bench.adapters.ensure(present), strict=True))
    return [None if i is None else named[i] for i in indices]


def lora_cost(rows: list[dict], copy_gbps: float) -> None:
    """Adds to each LoRA row its step time over the no-LoRA row of the same batch size, and the
    part of it its extra bytes (the adapters) explain at the copy bandwidth."""
    base = {r["batch"]: r for r in rows if r["workload"] == "no_lora"}
    for r in rows:
        ref = base.get(r["batch"])
        if r["workload"] == "no_lora" or ref is None:
            continue
        extra_ms = r["decode_step_ms"] - ref["decode_step_ms"]
        explained_ms = r["bytes_adapters_MB"] * 1e6 / (copy_gbps * 1e9) * 1e3
        r["lora_extra_ms"] = extra_ms
        r["lora_explained_ms"] = explained_ms
        r["lora_cost_ratio"] = extra_ms / explained_ms if explained_ms > 0 else float("nan")


def run_offline(
    bench: BenchEngine,
    config: OfflineConfig,
    copy_gbps: float,
    *,
    time_budget_s: float | None = None,
    on_row=None,
) -> dict:
    """Every (batch size, workload) row, batch sizes outermost; rows that would start after
    time_budget_s (the first row always runs) are listed as not run. on_row(rows) is called
    after each row (checkpoints)."""
    start = time.perf_counter()
    rows, skipped = [], []
    with GpuMonitor() as monitor:
        for batch in config.batch_sizes:
            for workload in config.workloads:
                elapsed = time.perf_counter() - start
                if rows and time_budget_s is not None and elapsed > time_budget_s:
                    skipped.append({"batch": batch, "workload": workload})
                    continue
                rows.append(run_row(bench, config, batch, workload, copy_gbps, monitor))
                lora_cost(rows, copy_gbps)
                if on_row is not None:
                    on_row(rows)
    return {
        "config": dataclasses.asdict(config),
        "projection_kernel_used": bench.projection_kernel_used,
        "runner": bench.runner_config,
        "rows": rows,
        "not_run": skipped,
    }

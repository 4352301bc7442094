"""Serving over HTTP against the engine in-process: what the OpenAI server costs.

One BenchEngine serves S-LoRA's trace (the online section's requests: ``OnlineConfig``) twice:

1. in-process, stepped by this thread (``online.run_trace``, prefix caching off): the baseline,
   the engine with no server around it;
2. behind the OpenAI-compatible server (``create_app`` over ``LLM.from_engine``: uvicorn in a
   thread of this process, the engine in its own thread, as ``scripts/serve.py`` runs them),
   with the requests sent by ``serving_client`` from a process of its own: token-id prompts to
   ``/v1/completions``, streamed, each at its arrival time.

The engine has a tokenizer (a synthetic byte-level BPE of the model's vocabulary size:
``structured.synthetic_tokenizer``), so both passes detokenize their outputs and the server
streams text as it would. A row gives both passes' throughput and latencies, the HTTP pass's
ratios to the in-process one, and the HTTP pass's floor (its decode steps' bytes at the copy
rate plus its prompts' FLOPs at the matmul rate, ``online.trace_floor``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

from jaxlora.heap import GcRecorder, frozen_heap

from .engine_setup import BenchEngine
from .gpu_monitor import GpuMonitor
from .online import OnlineConfig, monitored, run_trace, trace_floor
from .serving_client import save_requests, summarize, trace_requests
from .timing import CompileCounter, host_ms_since, host_snapshot
from .workloads import synthetic_trace

log = logging.getLogger("jaxlora.bench")

BASE_MODEL_NAME = "base"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_tokenizer(vocab_size: int):
    """The engine's tokenizer for the serving benchmark: a synthetic byte-level BPE of
    vocab_size ids, EOS last (random weights need no real vocabulary, the server's text
    streaming needs one)."""
    from jaxlora.tokenizer import Tokenizer

    from .structured import synthetic_tokenizer

    backend = synthetic_tokenizer(vocab_size).backend
    return Tokenizer(backend, eos_tokens=("<eos>",), source=f"synthetic_tokenizer({vocab_size})")


@dataclasses.dataclass(frozen=True)
class ServerVariant:
    """Server options a serving pass runs with: ``ServerConfig.stream_interval``, and its
    ``switch_interval_s`` in ms (0: the interpreter's own, 5 ms)."""

    stream_interval: int = 1
    switch_interval_ms: float = 0.0

    @property
    def switch_interval_s(self) -> float | None:
        return self.switch_interval_ms / 1e3 if self.switch_interval_ms else None

    @property
    def label(self) -> str:
        return variant_label(self.stream_interval, self.switch_interval_ms)


def variant_label(stream_interval: int, switch_interval_ms: float) -> str:
    """How a report names a serving pass's server options ("" for the defaults)."""
    parts = []
    if stream_interval != 1:
        parts.append(f"stream interval {stream_interval}")
    if switch_interval_ms:
        parts.append(f"switch interval {switch_interval_ms:g} ms")
    return ", ".join(parts)


def server_variants(stream_intervals, switch_intervals_ms) -> tuple[ServerVariant, ...]:
    """Every pairing of the flags' values (--serving_stream_interval,
    --serving_switch_interval_ms: lists of strings), ConfigError naming a bad one."""
    from jaxlora.config import parse_positive_ints
    from jaxlora.errors import ConfigError

    intervals = parse_positive_ints(list(stream_intervals), flag="--serving_stream_interval")
    switches = []
    for item in switch_intervals_ms:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1000:  # (NaN too)
            raise ConfigError(
                "--serving_switch_interval_ms: expected ms in [0, 1000] (0: the interpreter's "
                f"own), got {item!r}"
            )
        switches.append(value)
    for flag, values in (
        ("--serving_stream_interval", intervals),
        ("--serving_switch_interval_ms", switches),
    ):
        if not values:
            raise ConfigError(f"{flag}: expected at least one value, got none")
    return tuple(ServerVariant(i, s) for i in intervals for s in switches)


def _client(url: str, requests_path: str, results_path: str, timeout_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": _REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAXLORA_BENCH_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "jaxlora.bench.serving_client", url, requests_path, results_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"serving client failed ({done.returncode}): {done.stderr[-2000:]}")


def _thread_cpu_s(thread) -> float:
    """A running thread's CPU seconds so far (NaN where the platform cannot say)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return float("nan")


def serve_http(
    bench: BenchEngine,
    config: OnlineConfig,
    num_adapters: int,
    *,
    copy_gbps: float | None = None,
    matmul_tflops: float | None = None,
    variant: ServerVariant = ServerVariant(),
) -> dict:
    """The trace through the OpenAI server (pass 2 of the module docstring) with the server
    options of variant; one row."""
    from jaxlora.llm import LLM
    from jaxlora.server import ServerConfig, ServingState, create_app
    from jaxlora.server.background import BackgroundServer

    engine, manager = bench.engine, bench.manager
    trace = synthetic_trace(config.trace(num_adapters))
    names = bench.adapters.ensure([r.adapter for r in trace])
    model_of = dict(zip((r.adapter for r in trace), names, strict=True))
    requests = trace_requests(
        trace,
        model_of.__getitem__,
        vocab_size=engine.config.vocab_size,
        seed=config.seed,
        prefix_len=config.prefix_len,
    )
    manager.evict_all_unused()
    engine.set_prefix_caching(False)
    state = ServingState(
        LLM.from_engine(engine),
        ServerConfig(
            model_name=BASE_MODEL_NAME,
            stream_interval=variant.stream_interval,
            switch_interval_s=variant.switch_interval_s,
        ),
    )
    # The engine is started and stopped here, not by the app: the app's shutdown would also
    # close the adapter manager, which the next trace (in-process or not) still needs.
    app = create_app(state, manage_engine=False)
    prompt_tokens_before = engine.stats.prompt_tokens
    preemptions_before = engine.stats.preemptions
    iterations_before = engine.stats.steps
    host_before = host_snapshot(engine.stats)
    bench.timer.take()
    bench.timer.blocking = False
    timeout_s = config.duration_s + config.drain_timeout_s + 120
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            frozen_heap(config.freeze_heap),
            CompileCounter() as compiles,
            GcRecorder() as collections,
        ):
            requests_path = os.path.join(tmp, "requests.json")
            results_path = os.path.join(tmp, "results.json")
            save_requests(requests_path, requests)
            state.start()
            try:
                with BackgroundServer(app) as server:
                    _client(server.base_url, requests_path, results_path, timeout_s)
                    # (the CPU each thread spent, read before they end: the server's share of
                    # the one interpreter lock the engine's host work also needs)
                    threads_cpu_s = {
                        "server": _thread_cpu_s(server._thread),
                        "engine": _thread_cpu_s(engine._thread),
                    }
            finally:
                engine.stop()
            with open(results_path) as f:
                results = json.load(f)
    finally:
        bench.timer.blocking = True
    records = bench.timer.take()
    decode = [r for r in records if r.mode == "decode"]
    iterations = engine.stats.steps - iterations_before
    host, host_cpu = host_ms_since(engine.stats, host_before, iterations)
    row = {
        "num_adapters": num_adapters,
        "prefix_len": config.prefix_len,
        "stream_interval": variant.stream_interval,
        "switch_interval_ms": variant.switch_interval_ms,
        **summarize(results, config.slo_s),
        "offered_rps": len(trace) / trace[-1].arrival_s if trace else float("nan"),
        "decode_steps": len(decode),
        "decode_rows_mean": (sum(r.rows for r in decode) / len(decode)) if decode else 0.0,
        "prefill_steps": sum(r.mode == "prefill" for r in records),
        "prompt_tokens_computed": engine.stats.prompt_tokens - prompt_tokens_before,
        "preemptions": engine.stats.preemptions - preemptions_before,
        "compilations_while_timed": compiles.count,
        "gc": collections.summary(),
        # CPU seconds of the HTTP server's thread (uvicorn's event loop: the handlers, the
        # delta pump, the SSE writes) and of the engine's, over the pass; and the server's a
        # streamed token
        "server_thread_cpu_s": threads_cpu_s["server"],
        "engine_thread_cpu_s": threads_cpu_s["engine"],
        "server_cpu_us_per_token": 1e6
        * threads_cpu_s["server"]
        / max(1, sum(r["completion_tokens"] or 0 for r in results)),
        # The engine's iterations by phase, wall and its thread's CPU (as the in-process
        # row's): wall far above CPU outside "wait" is the engine waiting for the lock
        "host_ms_per_step": host,
        "host_cpu_ms_per_step": host_cpu,
        **trace_floor(
            bench,
            records,
            # (the prompts that got a first token: computed whole, caching being off)
            [
                (0, len(q.prompt))
                for q, r in zip(requests, results, strict=True)
                if r["chunk_times"]
            ],
            copy_gbps,
            matmul_tflops,
        ),
    }
    log.info(
        "serving n=%d over HTTP%s: %.2f req/s, %.0f tok/s, ttft p50 %.3f s p99 %.3f s, "
        "tpot %.1f ms, itl p99 %.1f ms, %d errors",
        num_adapters,
        f" ({variant.label})" if variant.label else "",
        row["throughput_rps"],
        row["output_tokens_per_s"],
        row["ttft_p50_s"],
        row["ttft_p99_s"],
        row["tpot_ms_median"],
        row["itl_ms_p99"],
        row["errors"],
    )
    return row


def run_serving(
    bench: BenchEngine,
    config: OnlineConfig,
    *,
    on_row=None,
    copy_gbps: float | None = None,
    matmul_tflops: float | None = None,
    variants: tuple[ServerVariant, ...] = (ServerVariant(),),
    in_process: bool = True,
) -> dict:
    """Every trace of config.adapter_counts in-process, then over HTTP once for each of the
    server's variants (prefix caching off). A row's "http" lists the variants' passes; its
    "in_process" is None where in_process is False (the HTTP passes only: a baseline measured
    before, on the same machine and code, is not measured again)."""
    rows = []
    with GpuMonitor() as monitor:
        for count in config.adapter_counts:
            engine_row = None
            if in_process:
                engine_row = monitored(
                    monitor,
                    lambda count=count: run_trace(
                        bench, config, count, copy_gbps=copy_gbps, matmul_tflops=matmul_tflops
                    ),
                )
            http_rows = [
                monitored(
                    monitor,
                    lambda count=count, variant=variant: serve_http(
                        bench,
                        config,
                        count,
                        copy_gbps=copy_gbps,
                        matmul_tflops=matmul_tflops,
                        variant=variant,
                    ),
                )
                for variant in variants
            ]
            rows.append({"num_adapters": count, "in_process": engine_row, "http": http_rows})
            if on_row is not None:
                on_row(rows)
    return {"config": dataclasses.asdict(config), "rows": rows}

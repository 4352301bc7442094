"""Timing the engine's model steps, counting compilations, compiling the step shapes in parallel.

``StepTimer`` wraps the engine runner's ``run``: each step is timed from its dispatch until its
logits are ready (``block_until_ready``), so a record is the step's device time plus the dispatch
and argument transfer of the host-built batch, the part of an engine iteration that the model
step costs. Waiting for each step makes the device wait for the host between steps, as
synchronous scheduling would; the benchmarks measure throughput in separate untimed passes
(``enabled = False``), or count steps without waiting (``blocking = False``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from . import roofline

log = logging.getLogger("jaxlora.bench")

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class StepRecord:
    mode: str  # "decode" | "prefill"
    bucket_rows: int  # rows of the compiled shape (padding included)
    seq_lens: tuple[int, ...]  # of the live rows
    slot_ranks: tuple[tuple[int, ...], ...]  # the 7 ranks of each distinct adapter in the step
    use_lora: bool
    seconds: float
    # K/V token slots the rows read, each shared page once (roofline.kv_tokens_read)
    kv_tokens: int | None = None

    @property
    def rows(self) -> int:
        return len(self.seq_lens)


def host_snapshot(stats) -> tuple[dict, dict]:
    """The engine's host seconds by phase so far: wall (``EngineStats.host_seconds``) and its
    thread's CPU in them (``host_cpu_seconds``)."""
    return dict(stats.host_seconds), dict(stats.host_cpu_seconds)


def host_ms_since(stats, before: tuple[dict, dict], iterations: int) -> tuple[dict, dict]:
    """Host milliseconds per iteration by phase since the snapshot ``before``
    (``host_snapshot``) over ``iterations`` engine iterations: wall, and the engine thread's
    CPU (where far below the wall, the phase was blocked: on the device, or on the
    interpreter lock)."""

    def per_iteration(now, then):
        return {
            phase: (seconds - then.get(phase, 0.0)) * 1e3 / max(1, iterations)
            for phase, seconds in now.items()
        }

    wall, cpu = before
    return per_iteration(stats.host_seconds, wall), per_iteration(stats.host_cpu_seconds, cpu)


class StepTimer:
    """Records every model step the engine runs (see the module docstring)."""

    def __init__(self, engine):
        self.records: list[StepRecord] = []
        # False: steps run untimed and unblocked (with async scheduling the device then never
        # waits for the host); the free-running passes of the benchmarks.
        self.enabled = True
        # False: steps are recorded (rows, adapters) but not waited for; seconds is NaN.
        self.blocking = True
        self._run = engine.runner.run
        engine.runner.run = self._timed_run
        self._page_size = engine.engine_config.kv.page_size
        self._window = engine.config.attention_window

    def _timed_run(
        self, mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora, register=None, **extra
    ):
        start = time.perf_counter()
        out = self._run(
            mode,
            k_pool,
            v_pool,
            lora_pools,
            batch,
            lora_meta,
            use_lora,
            register=register,
            **extra,
        )
        if not self.enabled:
            return out
        if self.blocking:
            jax.block_until_ready(out[0])
            seconds = time.perf_counter() - start
        else:
            seconds = float("nan")
        seq_lens = np.asarray(batch.seq_lens)
        token_slot = np.asarray(batch.token_slot)
        slots = np.unique(token_slot[token_slot >= 0]) if use_lora else np.zeros(0, np.int32)
        ranks = np.asarray(lora_meta["ranks"])[slots] if slots.size else np.zeros((0, 7))
        self.records.append(
            StepRecord(
                mode=mode,
                bucket_rows=int(seq_lens.shape[0]),
                seq_lens=tuple(int(n) for n in seq_lens[seq_lens > 0]),
                slot_ranks=tuple(tuple(int(r) for r in row) for row in ranks),
                use_lora=bool(use_lora),
                seconds=seconds,
                kv_tokens=roofline.kv_tokens_read(
                    seq_lens, np.asarray(batch.page_table), self._page_size, self._window
                )
                if mode == "decode"
                else None,
            )
        )
        return out

    def take(self) -> list[StepRecord]:
        """The records since the last take()."""
        records, self.records = self.records, []
        return records


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) while active: a timed region that
    compiled measured the compiler, and says so in its results."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event, duration, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def compile_step_shapes(engine) -> dict:
    """Runs the engine's warm-up (every step shape compiled on its config's compile_threads,
    then run once with its samplers) and returns its shapes and seconds, with the number of XLA
    compilations it made."""
    with CompileCounter() as compiled:
        report = engine.warmup()
    return {**report, "compilations": compiled.count}

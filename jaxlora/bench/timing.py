"""Timing the engine's model steps, counting compilations, compiling the step shapes in parallel.

``StepTimer`` wraps the engine runner's ``run``: each step is timed from its dispatch until its
logits are ready (``block_until_ready``), so a record is the step's device time plus the dispatch
and argument transfer of the host-built batch, the part of an engine iteration that the model
step costs. The engine itself waits for every step's sampled tokens right after, so the extra
wait adds no idle time to the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.engine.runner import empty_batch

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

    @property
    def rows(self) -> int:
        return len(self.seq_lens)


class StepTimer:
    """Records every model step the engine runs (see the module docstring)."""

    def __init__(self, engine):
        self.records: list[StepRecord] = []
        self._run = engine.runner.run
        engine.runner.run = self._timed_run

    def _timed_run(self, mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora):
        start = time.perf_counter()
        out = self._run(mode, k_pool, v_pool, lora_pools, batch, lora_meta, use_lora)
        jax.block_until_ready(out[0])
        seconds = time.perf_counter() - start
        seq_lens = np.asarray(batch.seq_lens)
        token_slot = np.asarray(batch.token_slot)
        slots = np.unique(token_slot[token_slot >= 0]) if use_lora else np.zeros(0, np.int32)
        ranks = np.asarray(lora_meta["ranks"])[slots] if slots.size else np.zeros((0, 7))
        self.records.append(StepRecord(
            mode=mode, bucket_rows=int(seq_lens.shape[0]),
            seq_lens=tuple(int(n) for n in seq_lens[seq_lens > 0]),
            slot_ranks=tuple(tuple(int(r) for r in row) for row in ranks),
            use_lora=bool(use_lora), seconds=seconds))
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


def _commit_kv_pools(engine) -> None:
    """Replaces the (empty) KV pools by zeros committed to the default device.

    Fresh pools are uncommitted and a step that reads the committed adapter pools returns them
    committed; jit specializes on that, so steps compiled for the fresh pools would be compiled
    again once the first LoRA step ran.
    """
    kv = engine.kv
    if kv.num_sequences or kv.k_pool.committed:
        return
    shape, dtype = kv.k_pool.shape, kv.k_pool.dtype
    for name in ("k_pool", "v_pool"):
        getattr(kv, name).delete()  # freed before the new one is allocated
        setattr(kv, name, jnp.zeros(shape, dtype, device=jax.devices()[0]))


def compile_step_shapes(engine, *, threads: int) -> dict:
    """Compiles every step shape of the engine (its runner's buckets, with and without LoRA)
    on `threads` threads, then runs the engine's own warm-up, which then finds them compiled and
    also compiles the sampler. Returns the shapes and the seconds spent.

    Lowering happens on this thread (tracing is Python); the XLA compilations, which release the
    GIL, run in parallel. The engine has no parallel warm-up of its own: this reaches into its
    runner's jitted step and its metadata builder, the arguments its warm-up passes.
    """
    start = time.perf_counter()
    max_pages = engine.engine_config.kv.max_pages_per_seq
    _commit_kv_pools(engine)
    lowered = []
    for mode, rows, length in engine.runner.bucket_shapes():
        batch = empty_batch(rows, length, max_pages)
        lora_meta = engine._lora_meta([], batch.token_slot)
        for use_lora in (False, True) if engine.adapters is not None else (False,):
            with engine._locked_lora_pools() as lora_pools:
                lowered.append(((mode, rows, use_lora), engine.runner._step.lower(
                    engine.runner.params, engine.kv.k_pool, engine.kv.v_pool, lora_pools,
                    batch, lora_meta, mode=mode, use_lora=use_lora)))
    lowered_at = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(lambda item: item[1].compile(), lowered))
    compiled_at = time.perf_counter()
    with CompileCounter() as during_warmup:
        engine.warmup()
    done = time.perf_counter()
    log.info("lowered %d step shapes in %.1f s, compiled them in %.1f s; warm-up %.1f s "
             "(%d more compilations)", len(lowered), lowered_at - start,
             compiled_at - lowered_at, done - compiled_at, during_warmup.count)
    return {"shapes": [list(key) for key, _ in lowered], "lower_s": lowered_at - start,
            "compile_s": compiled_at - lowered_at, "warmup_s": done - compiled_at,
            "warmup_compilations": during_warmup.count}

"""Python's garbage collector around a serving loop.

A full (generation 2) collection scans every tracked object in the process: JAX's caches, the
modules, the engine. Every in-flight request waits for it. Serving processes therefore freeze
what exists once they are warm (``freeze_startup_objects``; vLLM and SGLang do the same), so
that later collections scan only what requests create. ``GcRecorder`` measures the collections
a timed region paid for, so a benchmark can tell a collector stall from a slow step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time


def freeze_startup_objects() -> float:
    """Moves every object alive now into Python's permanent generation, after one full
    collection (whose seconds it returns). With the small test engine loaded, a full collection
    took 74-82 ms on a CPU of this project's machines and 0.0 ms after the freeze. Objects
    frozen here are never collected, should they later become unreachable cycles: for a process
    that serves one engine, or inside ``frozen_heap``, which undoes it."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


@contextlib.contextmanager
def frozen_heap(enabled: bool = True):
    """``freeze_startup_objects`` for the block, then ``gc.unfreeze()``: for a process that
    serves several engines in turn (the benchmarks), whose dropped engines must stay
    collectable. The unfreeze returns every frozen object to the collector, those of an earlier
    freeze too (CPython itself starts with a few hundred frozen): not for use inside a serving
    process that froze once warm. Yields the seconds of the collection before the freeze (0.0
    when disabled)."""
    if not enabled:
        yield 0.0
        return
    seconds = freeze_startup_objects()
    try:
        yield seconds
    finally:
        gc.unfreeze()


@dataclasses.dataclass(frozen=True)
class Collection:
    generation: int
    seconds: float
    collected: int


class GcRecorder:
    """Records each garbage collection (generation, seconds, objects freed) while active."""

    def __init__(self):
        self.collections: list[Collection] = []
        self._start: float | None = None

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.collections.append(
                Collection(
                    generation=int(info["generation"]),
                    seconds=time.perf_counter() - self._start,
                    collected=int(info["collected"]),
                )
            )
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        """Counts by generation, total and longest milliseconds: JSON for a benchmark row."""
        by_generation = {str(g): 0 for g in range(3)}
        for c in self.collections:
            by_generation[str(c.generation)] += 1
        full = [c.seconds for c in self.collections if c.generation == 2]
        return {
            "collections": by_generation,
            "ms_total": sum(c.seconds for c in self.collections) * 1e3,
            "ms_max": max((c.seconds for c in self.collections), default=0.0) * 1e3,
            "full_ms_max": max(full, default=0.0) * 1e3,
        }

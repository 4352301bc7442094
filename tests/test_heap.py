"""jaxlora.heap: the garbage collector frozen around serving, and its collections recorded."""

import gc

from jaxlora.heap import GcRecorder, frozen_heap


class _Cycle:
    def __init__(self):
        self.me = self


def test_frozen_heap_freezes_for_the_block_and_unfreezes_after():
    with frozen_heap() as seconds:
        assert seconds >= 0
        assert gc.get_freeze_count() > len(gc.get_objects())  # most objects are frozen
        later = _Cycle()
        assert any(o is later for o in gc.get_objects())  # new objects are collected as before
    assert gc.get_freeze_count() == 0
    with frozen_heap(enabled=False) as seconds:
        assert seconds == 0.0 and gc.get_freeze_count() == 0


def test_gc_recorder_records_each_collection():
    with GcRecorder() as recorder:
        for _ in range(3):
            _Cycle()
        gc.collect()
        gc.collect(0)
    summary = recorder.summary()
    assert summary["collections"]["2"] >= 1 and summary["collections"]["0"] >= 1
    full = [c for c in recorder.collections if c.generation == 2]
    assert full[0].collected >= 3  # the three unreachable cycles
    assert summary["ms_total"] >= summary["ms_max"] >= summary["full_ms_max"] > 0
    assert recorder._callback not in gc.callbacks
    gc.collect()
    assert len(recorder.collections) == sum(summary["collections"].values())  # stopped

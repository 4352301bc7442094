"""Host cost of a step's LoRA metadata builders (CPU; the sixtieth session's record).

build_slot_metadata and build_sgmv_metadata, median of 7 repeats of 2,000 calls each, for decode
batches of 8 / 64 rows with 1..64 adapters and a 256-token prefill of 4 adapters. The argument
is a label printed beside each row (e.g. the variant under test).

    PYTHONPATH=. python docs/results/s60/host_metadata.py current
"""

import statistics
import sys
import time

import numpy as np

from pallas_kernels.layout import SlotInfo, build_slot_metadata
from pallas_kernels.sgmv import build_sgmv_metadata


def slot_info(i: int) -> SlotInfo:
    pages = tuple((2 * i, 2 * i + 1) for _ in range(7))  # rank 16 at 8 rows a page
    return SlotInfo((16,) * 7, (2.0,) * 7, pages, pages)


def timed(fn, calls: int = 2000, repeats: int = 7) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(label: str) -> None:
    rng = np.random.default_rng(0)
    cases = {
        "decode 8 rows, 8 adapters": (np.arange(8, dtype=np.int32), 8),
        "decode 64 rows, 64 adapters": (np.arange(64, dtype=np.int32), 64),
        "decode 64 rows, 8 adapters": (rng.integers(0, 8, 64).astype(np.int32), 8),
        "decode 64 rows, 1 adapter": (np.zeros(64, np.int32), 1),
        "prefill 256 tokens, 4 adapters": (np.repeat(np.arange(4), 64).astype(np.int32), 4),
    }
    for name, (token_slot, adapters) in cases.items():
        slots = [slot_info(i) for i in range(adapters)]

        def slot_metadata(slots=slots):
            return build_slot_metadata(slots, max_slots=64, max_rank=32, rows_per_page=8)

        def sgmv_metadata(token_slot=token_slot):
            return build_sgmv_metadata(token_slot, 64)

        print(
            f"{label:>8} | {name:32} | slot metadata {timed(slot_metadata):7.1f} us | "
            f"sgmv metadata {timed(sgmv_metadata):7.1f} us"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "current")

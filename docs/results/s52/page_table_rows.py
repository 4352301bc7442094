"""Fifty-second session: the host time of a step's page-table rows (CPU, no GPU needed). 128
sequences ensured to a context, their rows (KVCacheManager.page_table_row) copied into a step's
table as Engine._launch does, best of 20. Run at 2f8b119 (rows built from the page lists) and
after (rows kept by the cache): PYTHONPATH=. python docs/results/s52/page_table_rows.py"""

import time

import numpy as np

from configs.models import TINY
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager

ROWS = 128

for max_len, context in ((4096, 384), (32768, 8192), (32768, 32768)):
    config = KVCacheConfig(
        page_size=16, num_pages=ROWS * (context // 16) + 10, max_model_len=max_len
    )
    kv = KVCacheManager(TINY, config)
    for seq in range(ROWS):
        assert kv.ensure(seq, context)
    table = np.zeros((ROWS, config.max_pages_per_seq), np.int32)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        for i in range(ROWS):
            table[i] = kv.page_table_row(i)
        best = min(best, time.perf_counter() - start)
    print(
        f"max_model_len {max_len}, context {context} ({context // 16} pages): {ROWS} rows "
        f"{best * 1e3:.3f} ms"
    )

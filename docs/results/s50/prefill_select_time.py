"""Fiftieth session: the GPU cost of the forty-ninth session's select in the prefill attention
(jaxlora.model._unread_keys_zeroed: the gathered K/V zeroed at the keys no token of a row
reads), timed against the same attention without it, at llama-2-7b's attention shapes (32
heads, 32 kv heads, head 128, bf16, pages of 16): 8 prompts' chunks of 256 tokens a step (the
offline benchmark's prefill) over page tables of 512 positions (the benchmark's 384-token
requests), 4,096 (the widest one-pass table) and 8,192 with the default 4,096-key blocks (the
blocked path). One layer's attention per call; each timing is one jit of ITERS dependent calls
(the next call's queries depend on this one's output), median of REPS, beside the HBM copy rate
measured in the same run. Run: PYTHONPATH=. python docs/results/s50/prefill_select_time.py"""

import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora.model as model
from configs.models import LLAMA2_7B

ITERS, REPS = 20, 7
ROWS, CHUNK, PAGE, HEADS, HEAD_DIM = 8, 256, 16, 32, 128


def _median_seconds(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_gbps():
    x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.float32)  # 1 GiB

    @jax.jit
    def loop(x):
        return jax.lax.fori_loop(0, ITERS, lambda i, y: y * 1.0001 + 1.0, x)

    seconds = _median_seconds(loop, x) / ITERS
    return 2 * x.nbytes / seconds / 1e9


def attention_loop(table_positions, block, select):
    pages_per_row = table_positions // PAGE
    rng = np.random.default_rng(0)
    table = rng.permutation(ROWS * pages_per_row).reshape(ROWS, pages_per_row).astype(np.int32)
    # Rows end anywhere in the table's second half (the blocked path visits up to the longest).
    ends = rng.integers(table_positions // 2, table_positions + 1, ROWS)
    starts = np.maximum(ends - CHUNK, 0)
    pool_shape = (1, ROWS * pages_per_row, PAGE, HEADS, HEAD_DIM)
    keys = jax.random.split(jax.random.key(1), 3)
    k_pool = jax.random.normal(keys[0], pool_shape, jnp.bfloat16)
    v_pool = jax.random.normal(keys[1], pool_shape, jnp.bfloat16)
    q = jax.random.normal(keys[2], (ROWS, CHUNK, HEADS, HEAD_DIM), jnp.bfloat16)
    positions = jnp.asarray(starts[:, None] + np.arange(CHUNK), jnp.int32)
    kv = model.KVCache(
        k_pool=k_pool,
        v_pool=v_pool,
        page_table=jnp.asarray(table),
        seq_lens=jnp.asarray(ends, jnp.int32),
        token_valid=jnp.asarray(np.arange(CHUNK)[None, :] < (ends - starts)[:, None]),
        mode="prefill",
        impl="pallas",
        prefill_key_block=block,
    )
    config = dataclasses.replace(LLAMA2_7B, num_layers=1)

    # The pools and the table are arguments, not constants the compiler could fold the
    # gathers of.
    def run(q, k_pool, v_pool, kv):
        def body(i, q):
            out = model._cached_attention(q, positions, 0, kv, k_pool, v_pool, config)
            return (q + out * 0.01).astype(q.dtype)

        return jax.lax.fori_loop(0, ITERS, body, q)

    fn = jax.jit(run)
    real = model._unread_keys_zeroed
    if not select:
        model._unread_keys_zeroed = lambda k, v, mask: (k, v)
    try:
        fn(q, k_pool, v_pool, kv).block_until_ready()  # traced and compiled with this choice
    finally:
        model._unread_keys_zeroed = real
    kv_bytes = 2 * ROWS * table_positions * HEADS * HEAD_DIM * 2
    return _median_seconds(fn, q, k_pool, v_pool, kv) / ITERS, kv_bytes


def main():
    print(jax.devices()[0].device_kind, jax.__version__)
    gbps = copy_gbps()
    print(f"copy: {gbps:,.0f} GB/s")
    rows = []
    for table_positions, block in ((512, None), (4096, 4096), (8192, 4096)):
        with_select, kv_bytes = attention_loop(table_positions, block, True)
        without, _ = attention_loop(table_positions, block, False)
        row = dict(
            table_positions=table_positions,
            key_block=block,
            without_ms=without * 1e3,
            with_select_ms=with_select * 1e3,
            change=with_select / without - 1,
            kv_table_mb=kv_bytes / 1e6,
            kv_table_at_copy_ms=kv_bytes / (gbps * 1e9) * 1e3,
        )
        rows.append(row)
        print(
            f"table {table_positions:5d} block {block}: without {row['without_ms']:.3f} ms, "
            f"with select {row['with_select_ms']:.3f} ms ({row['change']:+.1%}); "
            f"the rows' K/V table {row['kv_table_mb']:.0f} MB = "
            f"{row['kv_table_at_copy_ms']:.3f} ms at copy",
            flush=True,
        )
    json.dump(
        dict(copy_gbps=gbps, rows=rows),
        open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main()

"""Fiftieth session, an experiment: the prefill attention's dense call (XLA's
jax.nn.dot_product_attention over a chunk's gathered keys with the (row, query, key) mask) against
the same call with implementation="cudnn" (cuDNN's fused attention, the mask passed as it is), at
llama-2-7b's heads (32 / 32, head 128) and llama-3-8b's (32 / 8), bf16, 8 rows of 256-token chunks
ending in the second half of tables of 512 and 4,096 keys. Prints each one's median time (a jit of
ITERS dependent calls, median of REPS) and their largest difference.
Run: PYTHONPATH=. python docs/results/s50/prefill_cudnn.py"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

ITERS, REPS = 20, 7
ROWS, CHUNK, HEAD_DIM = 8, 256, 128


def _median_seconds(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case(keys, heads, kv_heads):
    rng = np.random.default_rng(0)
    ends = rng.integers(keys // 2, keys + 1, ROWS)
    starts = np.maximum(ends - CHUNK, 0)
    positions = starts[:, None] + np.arange(CHUNK)
    key_pos = np.arange(keys)
    mask = (key_pos[None, None, :] <= positions[:, :, None]) & (
        key_pos[None, None, :] < ends[:, None, None]
    )
    mask &= (np.arange(CHUNK)[None, :] < (ends - starts)[:, None])[:, :, None]
    k = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k[0], (ROWS, CHUNK, heads, HEAD_DIM), jnp.bfloat16)
    ck = jax.random.normal(k[1], (ROWS, keys, kv_heads, HEAD_DIM), jnp.bfloat16)
    cv = jax.random.normal(k[2], (ROWS, keys, kv_heads, HEAD_DIM), jnp.bfloat16)
    mask = jnp.asarray(mask)[:, None]
    outs, times = {}, {}
    for impl in ("xla", "cudnn"):

        def attend(q, ck, cv, mask, impl=impl):
            return jax.nn.dot_product_attention(
                q, ck, cv, mask=mask, scale=HEAD_DIM**-0.5, implementation=impl
            )

        def loop(q, ck, cv, mask, attend=attend):
            def body(i, q):
                return (q + attend(q, ck, cv, mask) * 0.01).astype(q.dtype)

            return jax.lax.fori_loop(0, ITERS, body, q)

        try:
            outs[impl] = np.asarray(jax.jit(attend)(q, ck, cv, mask), np.float32)
            times[impl] = _median_seconds(jax.jit(loop), q, ck, cv, mask) / ITERS
        except Exception as error:  # noqa: BLE001 (an experiment: report and go on)
            print(f"  {impl}: {type(error).__name__}: {str(error)[:300]}")
    line = f"keys {keys:5d} heads {heads}/{kv_heads}: " + ", ".join(
        f"{impl} {t * 1e3:.3f} ms" for impl, t in times.items()
    )
    if len(outs) == 2:
        valid = np.asarray(mask[:, 0].any(-1))  # rows' real tokens
        diff = np.abs(outs["xla"] - outs["cudnn"])[valid].max()
        line += f"; max |xla - cudnn| over real tokens {diff:.4f}"
        line += f"; cudnn / xla {times['cudnn'] / times['xla']:.3f}"
    print(line, flush=True)


def main():
    print(jax.devices()[0].device_kind, jax.__version__)
    for keys in (512, 4096):
        for heads, kv_heads in ((32, 32), (32, 8)):
            case(keys, heads, kv_heads)


if __name__ == "__main__":
    main()

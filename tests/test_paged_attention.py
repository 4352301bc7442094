"""Paged decode attention (interpret mode; compiled on a GPU), KV cache writes and gathers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import lower_for_gpu, triton_kernels
from jax.experimental import pallas as pl

from jaxlora.errors import ConfigError
from pallas_kernels.paged_attention import (
    PagedAttentionConfig,
    gather_kv,
    paged_attention,
    paged_attention_reference,
    rope_write_kv_kernel,
    rope_write_kv_reference,
    to_cache_dtype,
    write_kv,
)

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]


def make_cache(
    rng,
    seq_lens,
    *,
    num_layers=2,
    page_size=4,
    max_pages_per_seq=6,
    num_kv_heads=2,
    head_dim=16,
    spare_pages=5,
    dtype=jnp.float32,
):
    """Random pools (junk everywhere), a shuffled page table, and each row's dense K/V.

    Page-table entries beyond a row's length point at random (possibly shared) pages: the kernel
    must never read them.
    """
    batch = len(seq_lens)
    num_pages = batch * max_pages_per_seq + spare_pages
    shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    k_pool = np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
    v_pool = np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
    page_table = rng.integers(0, num_pages, (batch, max_pages_per_seq)).astype(np.int32)
    free = list(rng.permutation(num_pages))
    dense_k, dense_v = [], []
    for row, length in enumerate(seq_lens):
        used = -(-length // page_size)
        page_table[row, :used] = [free.pop() for _ in range(used)]
        pos = np.arange(length)
        pages = page_table[row, pos // page_size]
        dense_k.append(k_pool[:, pages, pos % page_size].astype(np.float64))
        dense_v.append(v_pool[:, pages, pos % page_size].astype(np.float64))
    return (
        jnp.asarray(k_pool),
        jnp.asarray(v_pool),
        jnp.asarray(page_table),
        jnp.asarray(np.asarray(seq_lens, np.int32)),
        dense_k,
        dense_v,
    )


def dense_attention(q, dense_k, dense_v, layer, sm_scale, softcap=None):
    """float64 numpy attention of each row's query over its dense K/V (rows of length 0: zeros);
    ``softcap``: scores capped as softcap * tanh(score / softcap) (Gemma 2's)."""
    q = np.asarray(q, np.float64)
    batch, num_heads, head_dim = q.shape
    out = np.zeros_like(q)
    for row in range(batch):
        k, v = dense_k[row][layer], dense_v[row][layer]  # (len, KVH, D)
        if k.shape[0] == 0:
            continue
        group = num_heads // k.shape[1]
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        logits = np.einsum("hd,shd->hs", q[row], k) * sm_scale
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[row] = np.einsum("hs,shd->hd", weights, v)
    return out


# Lengths: 1, page boundaries (4, 8, 24 = the full table), one past a boundary, inactive (0).
SEQ_LENS = (1, 4, 5, 0, 8, 24, 13)


def test_interpret_outputs_start_as_nan():
    """The poisoning the kernel tests rely on: interpret mode fills outputs with NaN, so an element
    the kernel forgets to write (an inactive row, a padding lane) shows up as NaN."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(
        writes_nothing, out_shape=jax.ShapeDtypeStruct((4,), jnp.float32), interpret=True
    )(jnp.zeros(4))
    assert np.isnan(np.asarray(out)).all()


def test_reference_matches_dense_attention():
    rng = np.random.default_rng(0)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(rng, SEQ_LENS, num_kv_heads=2)
    q = jnp.asarray(rng.standard_normal((len(SEQ_LENS), 4, 16)), jnp.float32)
    for layer in range(2):
        out = paged_attention_reference(
            q, k_pool, v_pool, page_table, seq_lens, layer, sm_scale=0.3
        )
        np.testing.assert_allclose(
            out, dense_attention(q, dk, dv, layer, 0.3), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("queries_per_kv", [1, 2, 4, 7])  # 7: Qwen2.5-7B's 28 / 4 heads
def test_kernel_interpret_matches_reference(queries_per_kv, dtype):
    rng = np.random.default_rng(queries_per_kv)
    num_kv_heads = 2
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, SEQ_LENS, num_kv_heads=num_kv_heads, dtype=dtype
    )
    q = jnp.asarray(rng.standard_normal((len(SEQ_LENS), num_kv_heads * queries_per_kv, 16)), dtype)
    config = PagedAttentionConfig(pages_per_block=4, kv_splits=1)
    out = paged_attention(
        q,
        k_pool,
        v_pool,
        page_table,
        seq_lens,
        jnp.int32(1),
        sm_scale=0.25,
        config=config,
        interpret=True,
    )
    assert out.dtype == dtype and out.shape == q.shape
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "an output element was never written"
    assert (out[np.asarray(SEQ_LENS) == 0] == 0).all()
    ref = paged_attention_reference(q, k_pool, v_pool, page_table, seq_lens, 1, sm_scale=0.25)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)
    np.testing.assert_allclose(out, dense_attention(q, dk, dv, 1, 0.25), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_interpret_kv_splits(dtype):
    """Three splits of 2 pages (32 keys) over a 6-page table: rows that end in each split, on a
    split boundary, and inactive rows (every split empty)."""
    rng = np.random.default_rng(7)
    lens = (1, 32, 33, 0, 64, 96, 70, 17)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, lens, page_size=16, num_kv_heads=1, dtype=dtype
    )
    q = jnp.asarray(rng.standard_normal((len(lens), 2, 16)), dtype)
    config = PagedAttentionConfig(pages_per_block=1, kv_splits=3)
    out = paged_attention(
        q, k_pool, v_pool, page_table, seq_lens, 0, sm_scale=0.25, config=config, interpret=True
    )
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    assert (out[np.asarray(lens) == 0] == 0).all()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, dense_attention(q, dk, dv, 0, 0.25), atol=tol, rtol=tol)


WINDOW_LENS = (1, 32, 33, 0, 64, 96, 70, 17)
# One kv split of 2-page blocks, and three of 1-page blocks (rows ending in each split).
ONE_AND_THREE_SPLITS = pytest.mark.parametrize(
    "config",
    [
        PagedAttentionConfig(pages_per_block=2, kv_splits=1),
        PagedAttentionConfig(pages_per_block=1, kv_splits=3),
    ],
    ids=["one_split", "kv_splits"],
)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@ONE_AND_THREE_SPLITS
@pytest.mark.parametrize("window", [1, 16, 20, 33, 200])
def test_sliding_window_attends_to_the_last_keys_only(window, config, dtype, interpret):
    """window: each row's query (position seq_len - 1) sees the keys at positions >= seq_len -
    window only: against float64 attention over those keys, for windows of one key, of a
    block, across a block's middle and split boundaries, and longer than every row (the full
    attention, bit for bit). Pages before a row's window hold NaN: never read."""
    rng = np.random.default_rng(window)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, WINDOW_LENS, page_size=16, num_kv_heads=2, dtype=dtype
    )
    page_size = 16
    k_pool, v_pool = np.asarray(k_pool).copy(), np.asarray(v_pool).copy()
    for row, length in enumerate(WINDOW_LENS):
        for pos in range(max(length - window, 0) // page_size * page_size):
            page = page_table[row, pos // page_size]
            k_pool[:, page, pos % page_size] = np.nan
            v_pool[:, page, pos % page_size] = np.nan
    k_pool, v_pool = jnp.asarray(k_pool), jnp.asarray(v_pool)
    q = jnp.asarray(rng.standard_normal((len(WINDOW_LENS), 4, 16)), dtype)
    args = (q, k_pool, v_pool, page_table, seq_lens, jnp.int32(1))
    out = paged_attention(*args, sm_scale=0.25, window=window, config=config, interpret=interpret)
    assert "window" in str(
        jax.make_jaxpr(
            functools.partial(paged_attention, sm_scale=0.25, window=window, config=config)
        )(*args)
    )
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    assert (out[np.asarray(WINDOW_LENS) == 0] == 0).all()
    last_k = [k[:, -window:] for k in dk]
    last_v = [v[:, -window:] for v in dv]
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, dense_attention(q, last_k, last_v, 1, 0.25), atol=tol, rtol=tol)
    ref = paged_attention_reference(*args, sm_scale=0.25, window=window)
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)
    if window >= max(WINDOW_LENS):
        whole = paged_attention(*args, sm_scale=0.25, config=config, interpret=interpret)
        np.testing.assert_array_equal(out, np.asarray(whole, np.float32))


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@ONE_AND_THREE_SPLITS
def test_soft_capped_scores_match_float64(config, dtype, interpret):
    """logit_softcap (Gemma 2's attn_logit_softcapping): scores become cap * tanh(score / cap)
    before the softmax, in one split and across splits; queries large enough that most scores
    pass the cap of 2, so the capped attention differs from the plain one. The reference
    agrees, and the launch is named after its cap (profiles show it); a bad cap is refused."""
    rng = np.random.default_rng(11)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, WINDOW_LENS, page_size=16, num_kv_heads=2, dtype=dtype
    )
    q = jnp.asarray(4.0 * rng.standard_normal((len(WINDOW_LENS), 4, 16)), dtype)
    args = (q, k_pool, v_pool, page_table, seq_lens, jnp.int32(1))
    out = paged_attention(
        *args, sm_scale=0.25, logit_softcap=2.0, config=config, interpret=interpret
    )
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and (out[np.asarray(WINDOW_LENS) == 0] == 0).all()
    tol = TOLERANCE[dtype]
    want = dense_attention(q, dk, dv, 1, 0.25, softcap=2.0)
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
    assert np.abs(want - dense_attention(q, dk, dv, 1, 0.25)).max() > 0.1
    ref = paged_attention_reference(*args, sm_scale=0.25, logit_softcap=2.0)
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)

    def attend(*args):
        return paged_attention(*args, sm_scale=0.25, logit_softcap=2.5, config=config)

    text = lower_for_gpu(attend, *args)
    assert triton_kernels(text) == 1 and "_softcap2p5" in text
    for bad in (0, -1.0, True):
        with pytest.raises(ConfigError, match=r"logit_softcap=.*expected None or a number > 0"):
            paged_attention(*args, sm_scale=0.25, logit_softcap=bad, interpret=True)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@ONE_AND_THREE_SPLITS
def test_a_traced_layer_window_is_the_static_window(config, dtype, interpret):
    """layer_window (Gemma 2: the window of the scan's traced layer, 1 << 30 on its full
    layers) given as a traced int32 computes what the static window does, bit for bit, for
    windows of 1, 20 and 33 keys, and the whole attention for an unbounded one; the reference
    takes it likewise; the launch is named for it and lowers for the GPU; it replaces window,
    never joins it."""
    rng = np.random.default_rng(13)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, WINDOW_LENS, page_size=16, num_kv_heads=2, dtype=dtype
    )
    q = jnp.asarray(rng.standard_normal((len(WINDOW_LENS), 4, 16)), dtype)
    args = (q, k_pool, v_pool, page_table, seq_lens, jnp.int32(1))

    @jax.jit
    def traced(window):
        return paged_attention(
            *args, sm_scale=0.25, layer_window=window, config=config, interpret=interpret
        )

    for window in (1, 20, 33, 1 << 30):
        out = np.asarray(traced(jnp.int32(window)), np.float32)
        static = None if window == 1 << 30 else window
        want = paged_attention(
            *args, sm_scale=0.25, window=static, config=config, interpret=interpret
        )
        np.testing.assert_array_equal(out, np.asarray(want, np.float32))
        ref = paged_attention_reference(*args, sm_scale=0.25, layer_window=jnp.int32(window))
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)

    def attend(*args):
        return paged_attention(*args, sm_scale=0.25, layer_window=jnp.int32(20), config=config)

    text = lower_for_gpu(attend, *args)
    assert triton_kernels(text) == 1 and "_layer_window" in text
    with pytest.raises(ConfigError, match="layer_window takes the place of window"):
        paged_attention(*args, sm_scale=0.25, window=4, layer_window=jnp.int32(4), interpret=True)


def test_a_bad_window_is_refused():
    rng = np.random.default_rng(0)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(rng, (3, 5))
    q = jnp.zeros((2, 2, 16), jnp.float32)
    for bad in (0, -3, 2.5, True):
        for fn in (paged_attention, paged_attention_reference):
            with pytest.raises(ConfigError, match=r"paged_attention.py .*window=.*expected None"):
                fn(q, k_pool, v_pool, page_table, seq_lens, 0, sm_scale=0.25, window=bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "config",
    [
        PagedAttentionConfig(pages_per_block=4, kv_splits=1),
        PagedAttentionConfig(pages_per_block=1, kv_splits=3),
        None,
    ],
    ids=["one_split", "kv_splits", "heuristic"],
)
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_lowers_for_the_gpu(config, dtype, window):
    """The configurations interpreted above also lower to Triton (tests/gpu_lowering.py), and
    so do a sliding window's skipped blocks and key mask."""
    rng = np.random.default_rng(5)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(
        rng, (1, 32, 33, 0, 64, 96), page_size=16, num_kv_heads=2, dtype=dtype
    )
    q = jnp.asarray(rng.standard_normal((6, 4, 16)), dtype)

    def attend(q, k_pool, v_pool, page_table, seq_lens, layer):
        return paged_attention(
            q,
            k_pool,
            v_pool,
            page_table,
            seq_lens,
            layer,
            sm_scale=0.25,
            window=window,
            config=config,
        )

    text = lower_for_gpu(attend, q, k_pool, v_pool, page_table, seq_lens, jnp.int32(0))
    assert triton_kernels(text) == 1 and ("_window20" in text) == (window is not None)


def test_kernel_in_scan_over_layers_with_heuristic_config():
    """The engine's use: the layer index is the traced scan counter, the config the default."""
    rng = np.random.default_rng(3)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(rng, (9, 1, 16), num_layers=3)
    q = jnp.asarray(rng.standard_normal((3, 3, 4, 16)), jnp.float32)  # (layers, B, H, D)

    @jax.jit
    def all_layers(q):
        def step(carry, inputs):
            layer, q_layer = inputs
            out = paged_attention(
                q_layer, k_pool, v_pool, page_table, seq_lens, layer, sm_scale=0.25, interpret=True
            )
            return carry, out

        return jax.lax.scan(step, 0, (jnp.arange(3, dtype=jnp.int32), q))[1]

    out = all_layers(q)
    for layer in range(3):
        np.testing.assert_allclose(
            out[layer], dense_attention(q[layer], dk, dv, layer, 0.25), atol=2e-5, rtol=2e-5
        )


def test_bad_shapes_raise_config_error():
    rng = np.random.default_rng(0)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(rng, (3, 5))
    q = jnp.zeros((2, 4, 16), jnp.float32)
    call = functools.partial(paged_attention, sm_scale=1.0, interpret=True)
    with pytest.raises(ConfigError, match="num_kv_heads=2"):
        call(jnp.zeros((2, 3, 16)), k_pool, v_pool, page_table, seq_lens, 0)
    with pytest.raises(ConfigError, match="head_dim=16"):
        call(jnp.zeros((2, 4, 8)), k_pool, v_pool, page_table, seq_lens, 0)
    with pytest.raises(ConfigError, match="seq_lens"):
        call(q, k_pool, v_pool, page_table, seq_lens[:1], 0)
    with pytest.raises(ConfigError, match="v_pool"):
        call(q, k_pool, v_pool[:, :3], page_table, seq_lens, 0)
    with pytest.raises(ConfigError, match="at least 16 keys"):
        call(
            q,
            k_pool,
            v_pool,
            page_table,
            seq_lens,
            0,
            config=PagedAttentionConfig(pages_per_block=2),
        )
    with pytest.raises(ConfigError, match="power of 2"):
        PagedAttentionConfig(pages_per_block=3)
    odd = jnp.zeros((2, 8, 4, 2, 24), jnp.float32)
    with pytest.raises(ConfigError, match="head_dim=24"):
        call(jnp.zeros((2, 4, 24)), odd, odd, page_table, seq_lens, 0)


def test_write_kv_decode_tokens_then_gather():
    """One token per row at its position; invalid rows and out-of-table positions write nothing."""
    rng = np.random.default_rng(1)
    page_size, kvh, dim = 4, 2, 8
    k_pool = jnp.zeros((2, 10, page_size, kvh, dim), jnp.bfloat16)
    v_pool = jnp.zeros_like(k_pool)
    page_table = jnp.asarray([[3, 7, 1], [0, 9, 2], [5, 6, 4], [8, 8, 8]], jnp.int32)
    positions = jnp.asarray([5, 0, 11, 12], jnp.int32)  # 12 is past the 3-page table
    valid = jnp.asarray([True, True, False, True])
    k_new = jnp.asarray(rng.standard_normal((4, kvh, dim)), jnp.bfloat16)
    v_new = k_new + 1
    k2, v2 = write_kv(k_pool, v_pool, k_new, v_new, page_table, positions, jnp.int32(1), valid)
    k2, v2 = np.asarray(k2, np.float32), np.asarray(v2, np.float32)
    np.testing.assert_array_equal(k2[1, 7, 1], np.asarray(k_new[0], np.float32))  # row 0, pos 5
    np.testing.assert_array_equal(v2[1, 0, 0], np.asarray(v_new[1], np.float32))  # row 1, pos 0
    written = np.zeros(k2.shape[:3], bool)
    written[1, 7, 1] = written[1, 0, 0] = True
    assert (k2[~written] == 0).all() and (v2[~written] == 0).all()

    k, v = gather_kv(jnp.asarray(k2), jnp.asarray(v2), page_table, 1, max_len=6)
    assert k.shape == (4, 6, kvh, dim)
    np.testing.assert_array_equal(k[0, 5], k2[1, 7, 1])
    np.testing.assert_array_equal(v[1, 0], v2[1, 0, 0])


def test_write_kv_chunks_round_trip_through_attention():
    """Rows filled chunk by chunk with (B, S) writes give the same cache as the dense K/V."""
    rng = np.random.default_rng(2)
    page_size, kvh, dim, layers = 4, 2, 16, 2
    lens = np.asarray([7, 12, 3])
    batch, chunk = len(lens), 5
    page_table = jnp.asarray(rng.permutation(12).reshape(batch, 4), jnp.int32)
    k_pool = jnp.full((layers, 12, page_size, kvh, dim), jnp.nan, jnp.float32)
    v_pool = k_pool
    dense_k = rng.standard_normal((layers, batch, 20, kvh, dim))
    dense_v = rng.standard_normal((layers, batch, 20, kvh, dim))
    write = jax.jit(write_kv)
    for start in range(0, 20, chunk):
        positions = jnp.asarray(
            np.broadcast_to(np.arange(start, start + chunk), (batch, chunk)), jnp.int32
        )
        valid = positions < jnp.asarray(lens)[:, None]
        for layer in range(layers):
            sl = slice(start, start + chunk)
            k_pool, v_pool = write(
                k_pool,
                v_pool,
                jnp.asarray(dense_k[layer][:, sl], jnp.float32),
                jnp.asarray(dense_v[layer][:, sl], jnp.float32),
                page_table,
                positions,
                layer,
                valid,
            )
    k, v = gather_kv(k_pool, v_pool, page_table, 1, max_len=12)
    for row, length in enumerate(lens):
        np.testing.assert_allclose(k[row, :length], dense_k[1, row, :length], rtol=1e-6)
        np.testing.assert_allclose(v[row, :length], dense_v[1, row, :length], rtol=1e-6)
    # From a page of each row's own (a sliding window's keys): position first * page_size + j
    # at j; indices past the table read its last page (masked by the caller).
    size = k_pool.shape[2]
    first_page = np.asarray([1, 2, 0])
    k, v = gather_kv(k_pool, v_pool, page_table, 1, 2 * size, jnp.asarray(first_page, jnp.int32))
    assert k.shape[1] == 2 * size
    for row, length in enumerate(lens):
        start = first_page[row] * size
        stop = min(length, start + 2 * size)
        if stop > start:
            np.testing.assert_allclose(k[row, : stop - start], dense_k[1, row, start:stop], 1e-6)
            np.testing.assert_allclose(v[row, : stop - start], dense_v[1, row, start:stop], 1e-6)
    with pytest.raises(ConfigError, match=r"first_page must have shape \(3,\)"):
        gather_kv(k_pool, v_pool, page_table, 1, size, jnp.zeros((2,), jnp.int32))
    q = jnp.asarray(rng.standard_normal((batch, 4, dim)), jnp.float32)
    dk = [[dense_k[la, r, :n] for la in range(layers)] for r, n in enumerate(lens)]
    dv = [[dense_v[la, r, :n] for la in range(layers)] for r, n in enumerate(lens)]
    expected = dense_attention(q, dk, dv, 1, 0.25)
    # Unwritten slots are NaN: any read past a row's length would poison the output.
    for attend in (functools.partial(paged_attention, interpret=True), paged_attention_reference):
        out = attend(q, k_pool, v_pool, page_table, jnp.asarray(lens, jnp.int32), 1, sm_scale=0.25)
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def _write_problem(seed, token_shape, num_kv_heads, head_dim, dtype):
    """NaN-filled pools (any stray or missing write shows), a shuffled page table, and one token
    for each reason to write nothing: invalid, a negative position, a position past the table,
    a page id of -1 and one of P (the pool's size); every other token writes. Tokens of a row
    never share a position. Needs at least 3 rows, and 3 tokens a row for (B, S)."""
    rng = np.random.default_rng(seed)
    layers, page_size, max_pages = 3, 4, 3
    batch = token_shape[0]
    per_row = 1 if len(token_shape) == 1 else token_shape[1]
    num_pages = batch * max_pages + 2
    shape = (layers, num_pages, page_size, num_kv_heads, head_dim)
    table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
    limit = max_pages * page_size
    rows = np.repeat(np.arange(batch), per_row)
    positions = np.concatenate([rng.permutation(limit)[:per_row] for _ in range(batch)])
    valid = np.ones(rows.size, bool)

    def place(token, position):
        same = np.flatnonzero((rows == rows[token]) & (positions == position))
        if same.size:
            positions[same[0]] = positions[token]
        positions[token] = position

    # Decode (B,): tokens 0, 1, 2 are rows 0, 1, 2; chunks (B, S): row 0's first three.
    valid[0] = False
    place(1, -1)
    place(2, limit + 1)
    no_page, past_pool = (batch - 2) * per_row, (batch - 1) * per_row  # their rows' first tokens
    table[batch - 2, -1], table[batch - 1, 0] = -1, num_pages
    place(no_page, limit - 1)
    place(past_pool, 0)
    k_new = jnp.asarray(rng.standard_normal((*token_shape, num_kv_heads, head_dim)), jnp.float32)
    return (
        jnp.full(shape, jnp.nan, dtype),
        jnp.full(shape, jnp.nan, dtype),
        k_new,
        k_new * 2 + 1,
        jnp.asarray(table, jnp.int32),
        jnp.asarray(positions.reshape(token_shape), jnp.int32),
        jnp.int32(1),
        jnp.asarray(valid.reshape(token_shape)),
    )


def _rope_problem(token_shape, num_heads, num_kv_heads, head_dim, dtype):
    """_write_problem's pools and tokens with a fused q|k|v and rotary tables: (qkv, cos, sin,
    k_pool, v_pool, page_table, positions, layer, valid), qkv in the pools' dtype as the model
    gives it."""
    k_pool, v_pool, k_new, v_new, table, positions, layer, valid = _write_problem(
        sum(token_shape) + num_heads, token_shape, num_kv_heads, head_dim, dtype
    )
    rng = np.random.default_rng(num_heads)
    q = jnp.asarray(rng.standard_normal((*token_shape, num_heads, head_dim)), jnp.float32)
    qkv = jnp.concatenate([q, k_new, v_new], axis=-2).astype(dtype)
    angles = rng.uniform(-np.pi, np.pi, (*token_shape, head_dim // 2))
    cos, sin = (jnp.asarray(f(angles), jnp.float32) for f in (np.cos, np.sin))
    return qkv, cos, sin, k_pool, v_pool, table, positions, layer, valid


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("token_shape", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        ((6,), 4, 2, 16, jnp.float32),
        ((6,), 6, 3, 16, jnp.bfloat16),  # 24 and 48 pairs a row: padding lanes
        ((3, 5), 4, 2, 16, jnp.bfloat16),
        ((4, 3), 8, 4, 8, jnp.float32),
        ((8,), 32, 8, 128, jnp.bfloat16),  # llama-3's heads
        ((8,), 28, 4, 128, jnp.bfloat16),  # Qwen2.5-7B's: groups of 7 query heads
    ],
)
def test_rope_write_kv_kernel_matches_rotation_then_scatter(
    token_shape, num_heads, num_kv_heads, head_dim, dtype, interpret
):
    """The fused rotation + write against rotate_half_reference then XLA's scatter: the rotated
    query of every token (invalid ones too), and every slot of both pools (NaN where unwritten;
    the five tokens of _write_problem that must not write do not). ``valid`` as bool and as
    int32 (the model's form)."""
    args = _rope_problem(token_shape, num_heads, num_kv_heads, head_dim, dtype)
    want = rope_write_kv_reference(*args)
    run = jax.jit(functools.partial(rope_write_kv_kernel, interpret=interpret))
    tolerance = 1e-6 if dtype == jnp.float32 else 8e-3
    for valid in (args[-1], args[-1].astype(jnp.int32)):
        got = run(*args[:-1], valid)
        for name, g, w in zip(("q", "k_pool", "v_pool"), got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=name)
            np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance, err_msg=name)
    assert want[0].shape == (*token_shape, num_heads, head_dim)
    written = ~np.isnan(np.asarray(want[1], np.float32)).all(axis=(3, 4))
    assert 0 < written.sum() <= np.prod(token_shape) - 5
    # The rotation moved the keys, and v is the last heads of qkv, unrotated.
    k_new, v_new = np.split(np.asarray(args[0], np.float32)[..., num_heads:, :], 2, axis=-2)
    unrotated, plain_v = write_kv(*args[3:5], k_new, v_new, *args[5:])
    got_k = np.asarray(got[1], np.float32)[written]
    assert not np.allclose(np.asarray(unrotated, np.float32)[written], got_k)
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(plain_v, np.float32))


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("token_shape", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        ((6,), 4, 2, 16, jnp.float32),
        ((3, 5), 6, 2, 16, jnp.bfloat16),  # 3 query heads a group: padding lanes, rows of them
        ((8,), 32, 8, 128, jnp.bfloat16),  # Qwen3-8B's heads
        ((8,), 40, 8, 128, jnp.bfloat16),  # Qwen3-14B's: 5 query heads a group
    ],
)
def test_rope_write_kv_kernel_normalizes_heads_as_the_reference(
    token_shape, num_heads, num_kv_heads, head_dim, dtype, interpret
):
    """head_norms (Qwen3's q_norm / k_norm): every q and k head RMS-normalized over head_dim
    (scales of their own, not ones) before the rotation, in the kernel's lanes, against
    residual_norm.rms_norm then the rotation and scatter; v untouched. The norms change q and
    the written keys (scaled inputs: a norm without effect would not pass)."""
    qkv, *rest = _rope_problem(token_shape, num_heads, num_kv_heads, head_dim, dtype)
    qkv = (qkv.astype(jnp.float32) * 3.0 + 0.5).astype(dtype)
    rng = np.random.default_rng(head_dim + num_heads)
    norms = tuple(
        jnp.asarray(1.0 + 0.5 * rng.standard_normal(head_dim), jnp.float32).astype(dtype)
        for _ in range(2)
    )
    want = rope_write_kv_reference(qkv, *rest, head_norms=norms, head_norm_eps=1e-6)
    kernel = functools.partial(rope_write_kv_kernel, head_norm_eps=1e-6, interpret=interpret)
    got = jax.jit(kernel)(qkv, *rest, head_norms=norms)
    plain = rope_write_kv_reference(qkv, *rest)
    # bf16: one rounding of the normalized value may differ (the sum of squares' order).
    tolerance = 2e-6 if dtype == jnp.float32 else 2e-2
    for name, g, w, p in zip(("q", "k_pool", "v_pool"), got, want, plain, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        g, w, p = (np.asarray(a, np.float32) for a in (g, w, p))
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=name)
        np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance, err_msg=name)
        written = ~np.isnan(w)
        if name == "v_pool":
            np.testing.assert_array_equal(g, p)
        else:
            assert not np.allclose(w[written], p[written], atol=0.1), name
    with pytest.raises(ConfigError, match=r"head_norms must be \(q's scale, k's scale\)"):
        rope_write_kv_kernel(qkv, *rest, head_norms=(norms[0],))


@pytest.mark.parametrize("head_norms", [False, True])
def test_rope_write_kv_kernel_lowers_in_place_for_the_gpu(head_norms):
    """One Triton launch for the rotation and both writes, pools aliased to its outputs, inside
    a scan over layers as the model runs it; with Qwen3's head norms (their reshape and row
    sums) too."""
    args = _rope_problem((8,), 32, 8, 128, jnp.bfloat16)
    norms = (jnp.ones(128, jnp.bfloat16), jnp.ones(128, jnp.bfloat16)) if head_norms else None

    def layers(qkv, cos, sin, k_pool, v_pool, table, positions, layer, valid):
        def step(pools, layer):
            q, *pools = rope_write_kv_kernel(
                qkv, cos, sin, *pools, table, positions, layer, valid, head_norms=norms
            )
            return tuple(pools), q

        return jax.lax.scan(step, (k_pool, v_pool), jnp.arange(3, dtype=jnp.int32))

    text = lower_for_gpu(layers, *args)
    assert triton_kernels(text) == 1 and "rope_write_kv_q4096_g8_w128_warps4" in text
    assert ("_headnorm" in text) == head_norms
    assert "output_operand_aliases" in text


def test_rope_write_kv_bad_shapes_raise():
    qkv, cos, sin, *rest = _rope_problem((3,), 4, 2, 8, jnp.float32)
    for fn in (rope_write_kv_kernel, rope_write_kv_reference):
        where = fn.__name__
        with pytest.raises(ConfigError, match=rf"{where}: qkv must have shape \(3, H \+ 4, 8\)"):
            fn(qkv[:, :4], cos, sin, *rest)
        with pytest.raises(ConfigError, match=rf"{where}: qkv must have shape"):
            fn(qkv[..., :4], cos, sin, *rest)
        with pytest.raises(ConfigError, match=rf"{where}: sin must have shape \(3, 4\), got"):
            fn(qkv, cos, jnp.zeros((3, 8)), *rest)
        with pytest.raises(ConfigError, match=rf"{where}: valid must have shape \(3,\)"):
            fn(qkv, cos, sin, *rest[:-1], rest[-1][:2])


def test_write_and_gather_bad_shapes_raise():
    pool = jnp.zeros((1, 4, 4, 2, 8))
    table = jnp.zeros((2, 2), jnp.int32)
    # rope_write_kv_kernel shares these checks (test_rope_write_kv_bad_shapes_raise).
    # (k_new shape, v_new shape, tokens, valid tokens, message)
    for k_shape, v_shape, tokens, valid_tokens, message in (
        ((2, 8), (2, 2, 8), 2, 2, r"write_kv: k_new must have shape \(2, 2, 8\)"),
        ((3, 2, 8), (3, 2, 8), 3, 3, "write_kv: positions"),
        ((2, 2, 8), (2, 2, 8), 2, 3, r"write_kv: valid must have shape \(2,\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            write_kv(
                pool,
                pool,
                jnp.zeros(k_shape),
                jnp.zeros(v_shape),
                table,
                jnp.zeros((tokens,), jnp.int32),
                0,
                jnp.ones((valid_tokens,), bool),
            )
    with pytest.raises(ConfigError, match="max_len=9"):
        gather_kv(pool, pool, table, 0, max_len=9)


# ------------------------------------------------------------------ fp8 pools (cache_dtype)

FP8 = [
    pytest.param(jnp.float8_e4m3fn, id="e4m3"),
    pytest.param(jnp.float8_e5m2, id="e5m2"),
]

# 1000 in each fp8 pool: saturated in e4m3 (+-448), rounded in e5m2 (2 mantissa bits).
_THOUSAND = {jnp.float8_e4m3fn: 448.0, jnp.float8_e5m2: 1024.0}


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cache_dtype", FP8)
def test_kernel_reads_fp8_pools_in_the_query_dtype(cache_dtype, q_dtype, interpret):
    """fp8 pools are read in q's dtype: the kernel's output is, bit for bit, its output over
    the same values in pools of q's dtype, and matches the reference on the fp8 pools and
    float64 attention over their values. Every element written (outputs start as NaN)."""
    rng = np.random.default_rng(11)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, SEQ_LENS, num_kv_heads=2, dtype=cache_dtype
    )
    assert k_pool.dtype == cache_dtype
    q = jnp.asarray(rng.standard_normal((len(SEQ_LENS), 4, 16)), q_dtype)
    attend = functools.partial(
        paged_attention,
        sm_scale=0.25,
        config=PagedAttentionConfig(pages_per_block=4, kv_splits=1),
        interpret=interpret,
    )
    out = attend(q, k_pool, v_pool, page_table, seq_lens, jnp.int32(1))
    assert out.dtype == q_dtype and out.shape == q.shape
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "an output element was never written"
    assert (out[np.asarray(SEQ_LENS) == 0] == 0).all()
    upcast = attend(
        q, k_pool.astype(q_dtype), v_pool.astype(q_dtype), page_table, seq_lens, jnp.int32(1)
    )
    np.testing.assert_array_equal(out, np.asarray(upcast, np.float32))
    ref = paged_attention_reference(q, k_pool, v_pool, page_table, seq_lens, 1, sm_scale=0.25)
    tol = TOLERANCE[q_dtype]
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)
    np.testing.assert_allclose(out, dense_attention(q, dk, dv, 1, 0.25), atol=tol, rtol=tol)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_to_cache_dtype_saturates_fp8_and_only_casts_otherwise(cache_dtype):
    x = jnp.asarray([1000.0, -1e5, 1.0, -0.5, np.inf, np.nan], jnp.float32)
    largest = float(jnp.finfo(cache_dtype).max)
    assert largest == {jnp.float8_e4m3fn: 448.0, jnp.float8_e5m2: 57344.0}[cache_dtype]
    got = np.asarray(to_cache_dtype(x, cache_dtype).astype(jnp.float32))
    np.testing.assert_array_equal(
        got, [_THOUSAND[cache_dtype], -largest, 1.0, -0.5, largest, np.nan]
    )
    # (a plain cast, the failure saturation avoids: e4m3 has no infinity)
    if cache_dtype == jnp.float8_e4m3fn:
        assert np.isnan(np.asarray(x[:2].astype(cache_dtype).astype(jnp.float32))).all()
    assert to_cache_dtype(x, jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(to_cache_dtype(x, jnp.bfloat16), np.float32),
        np.asarray(x.astype(jnp.bfloat16), np.float32),
    )


def _written_slots(pool) -> np.ndarray:
    """(P, page_size, KVH) of layer 1 (the write problems' layer): the slots a write filled."""
    return ~np.isnan(np.asarray(pool.astype(jnp.float32))[1, ..., 0])


def _saturated(pool, dtype) -> np.ndarray:
    """A float32 pool as an fp8 pool of ``dtype`` would hold it (numpy: clip, then cast)."""
    limit = float(jnp.finfo(dtype).max)
    return np.clip(np.asarray(pool, np.float32), -limit, limit).astype(dtype).astype(np.float32)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_write_kv_into_fp8_pools_saturates(cache_dtype):
    """The XLA scatter into fp8 pools: each written slot holds the saturated value (1000 as 448
    in e4m3, not NaN), unwritten slots stay NaN, as numpy's clip-and-cast of a float32 write."""
    k_pool, v_pool, k_new, v_new, *rest = _write_problem(4, (6,), 2, 8, jnp.float32)
    k_new = k_new.at[:, :, 0].set(1000.0).at[:, :, 1].set(-1e5)
    want_k, want_v = write_kv(k_pool, v_pool, k_new, v_new * 300, *rest)
    fp8_pools = (k_pool.astype(cache_dtype), v_pool.astype(cache_dtype))
    got_k, got_v = write_kv(*fp8_pools, k_new, v_new * 300, *rest)
    assert got_k.dtype == got_v.dtype == cache_dtype
    for got, want in ((got_k, want_k), (got_v, want_v)):
        np.testing.assert_array_equal(
            np.asarray(got.astype(jnp.float32)), _saturated(want, cache_dtype)
        )
    # Every written key's first element was 1000.
    first = np.asarray(got_k.astype(jnp.float32))[1, ..., 0][_written_slots(want_k)]
    assert first.size and (first == _THOUSAND[cache_dtype]).all()


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("qkv_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rope_write_kv_kernel_into_fp8_pools_saturates_as_the_reference(qkv_dtype, cache_dtype):
    """The fused RoPE + write (interpret) into fp8 pools: the reference's pools (the rotation,
    then write_kv's saturating cast), with large keys and values that saturate; the rotated
    query is unchanged by the pools' dtype."""
    qkv, cos, sin, k_pool, v_pool, *rest = _rope_problem((3, 5), 4, 2, 16, jnp.float32)
    heads, largest = 4, float(jnp.finfo(cache_dtype).max)
    # Keys and values of the format's range, many beyond it.
    qkv = qkv.at[..., heads:, :].multiply(largest).at[..., heads + 2 :, 0].set(1000.0)
    qkv = qkv.astype(qkv_dtype)
    fp8_pools = (k_pool.astype(cache_dtype), v_pool.astype(cache_dtype))
    want = rope_write_kv_reference(qkv, cos, sin, *fp8_pools, *rest)
    got = jax.jit(functools.partial(rope_write_kv_kernel, interpret=True))(
        qkv, cos, sin, *fp8_pools, *rest
    )
    # The kernel's float32 rotation may differ from XLA's by an ulp (as in
    # test_rope_write_kv_kernel_matches_rotation_then_scatter), which may round a key to the
    # next fp8 value: one step of the format.
    q_tolerance = 1e-6 if qkv_dtype == jnp.float32 else 8e-3
    for name, g, w in zip(("q", "k_pool", "v_pool"), got, want, strict=True):
        assert g.dtype == w.dtype, name
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=name)
        tolerance = q_tolerance if name == "q" else float(jnp.finfo(cache_dtype).eps)
        np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance, err_msg=name)
        if name != "q":
            assert np.nanmax(np.abs(g)) == largest, name  # some values saturated
    assert got[1].dtype == cache_dtype
    plain_q = rope_write_kv_reference(qkv, cos, sin, k_pool, v_pool, *rest)[0]
    np.testing.assert_array_equal(np.asarray(want[0], np.float32), np.asarray(plain_q, np.float32))
    # v is written unrotated: its 1000s land as _THOUSAND (e4m3: 448), never NaN.
    v = np.asarray(got[2].astype(jnp.float32))[1, ..., 0][_written_slots(want[2])]
    assert v.size and (v == _THOUSAND[cache_dtype]).all()


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_kernels_lower_for_the_gpu(cache_dtype):
    """Decode attention over fp8 pools (bf16 query; one split, and the heuristic's kv splits)
    and the fused RoPE + write into them lower to Triton (tests/gpu_lowering.py), the kernels
    taking the pools in fp8 (no conversion of the pools before the launch)."""
    pool_type = {jnp.float8_e4m3fn: "xf8E4M3FN>", jnp.float8_e5m2: "xf8E5M2>"}[cache_dtype]
    rng = np.random.default_rng(5)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(
        rng, (1, 32, 33, 0, 64, 96), page_size=16, num_kv_heads=2, dtype=cache_dtype
    )
    q = jnp.asarray(rng.standard_normal((6, 4, 16)), jnp.bfloat16)
    for config in (PagedAttentionConfig(pages_per_block=4, kv_splits=1), None):

        def attend(q, k_pool, v_pool, page_table, seq_lens, layer, config=config):
            return paged_attention(
                q, k_pool, v_pool, page_table, seq_lens, layer, sm_scale=0.25, config=config
            )

        text = lower_for_gpu(attend, q, k_pool, v_pool, page_table, seq_lens, jnp.int32(0))
        assert triton_kernels(text) == 1 and pool_type in text
    qkv, cos, sin, k_pool, v_pool, *rest = _rope_problem((8,), 8, 4, 16, jnp.bfloat16)

    def write(qkv, cos, sin, k_pool, v_pool, *rest):
        return rope_write_kv_kernel(qkv, cos, sin, k_pool, v_pool, *rest)

    pools = (k_pool.astype(cache_dtype), v_pool.astype(cache_dtype))
    text = lower_for_gpu(write, qkv, cos, sin, *pools, *rest)
    assert triton_kernels(text) == 1 and "output_operand_aliases" in text and pool_type in text


# ----------------------------------------------------------------------------- compiled (GPU)

GPU_SEQ_LENS = (1, 16, 17, 0, 255, 256, 1000, 2048, 33, 0, 511, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("queries_per_kv", [1, 4, 7, 8])
@pytest.mark.parametrize(
    "config",
    [
        None,
        PagedAttentionConfig(pages_per_block=4, kv_splits=1),
        PagedAttentionConfig(pages_per_block=8, kv_splits=4, num_warps=8, num_stages=3),
    ],
    ids=["heuristic", "p4k1", "p8k4"],
)
def test_compiled_kernel_matches_reference(config, queries_per_kv, dtype):
    rng = np.random.default_rng(queries_per_kv)
    num_kv_heads, head_dim = 8, 128
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(
        rng,
        GPU_SEQ_LENS,
        num_layers=2,
        page_size=16,
        max_pages_per_seq=128,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    q = jnp.asarray(
        rng.standard_normal((len(GPU_SEQ_LENS), num_kv_heads * queries_per_kv, head_dim)), dtype
    )
    scale = head_dim**-0.5
    out = paged_attention(
        q, k_pool, v_pool, page_table, seq_lens, jnp.int32(1), sm_scale=scale, config=config
    )
    ref = paged_attention_reference(q, k_pool, v_pool, page_table, seq_lens, 1, sm_scale=scale)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    assert (out[np.asarray(GPU_SEQ_LENS) == 0] == 0).all()
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_compiled_kernel_in_scan_over_layers():
    rng = np.random.default_rng(5)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(
        rng,
        GPU_SEQ_LENS,
        num_layers=4,
        page_size=16,
        max_pages_per_seq=128,
        num_kv_heads=8,
        head_dim=128,
        dtype=jnp.bfloat16,
    )
    q = jnp.asarray(rng.standard_normal((4, len(GPU_SEQ_LENS), 32, 128)), jnp.bfloat16)

    def run(attend):
        def step(carry, inputs):
            layer, q_layer = inputs
            return carry, attend(
                q_layer, k_pool, v_pool, page_table, seq_lens, layer, sm_scale=0.088
            )

        return jax.jit(lambda q: jax.lax.scan(step, 0, (jnp.arange(4, dtype=jnp.int32), q))[1])

    out = np.asarray(run(paged_attention)(q), np.float32)
    ref = np.asarray(run(paged_attention_reference)(q), np.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------
# o's LoRA shrink in the attention launch
# ------------------------------------------------------------------------------------------------


def _shrink_problem(seed, lens, num_kv_heads, queries_per_kv, dtype, head_dim=16):
    """A cache of make_cache and an o-shaped LoRA problem of tests/test_sgmv.py over the
    attention output's width (A NaN beyond every rank and on free pages, shuffled pages, mixed
    ranks, rows without adapter)."""
    from tests.test_sgmv import make_problem

    rng = np.random.default_rng(seed)
    k_pool, v_pool, page_table, seq_lens, dk, dv = make_cache(
        rng, lens, num_layers=2, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
    )
    num_heads = num_kv_heads * queries_per_kv
    q = jnp.asarray(rng.standard_normal((len(lens), num_heads, head_dim)), dtype)
    problem = make_problem(
        seed + 1,
        num_tokens=len(lens),
        in_width=num_heads * head_dim,
        out_widths=(num_heads * head_dim,),
        num_layers=2,
        dtype=dtype,
    )
    tables = (problem.a_pool, problem.a_pages, problem.ranks, jnp.asarray(problem.token_slot))
    return (q, k_pool, v_pool, page_table, seq_lens), tables, problem


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("queries_per_kv", [1, 2, 4])
def test_attention_shrink_matches_reference(queries_per_kv, dtype, interpret):
    """Attention and o's LoRA shrink in one launch: the output is paged_attention's, bit for
    bit; v is the shrink of that output (each kv head's share summed by XLA)."""
    from pallas_kernels.paged_attention import (
        paged_attention_shrink,
        paged_attention_shrink_reference,
    )
    from pallas_kernels.sgmv import sgmv_shrink_reference

    cache, tables, problem = _shrink_problem(queries_per_kv, SEQ_LENS, 2, queries_per_kv, dtype)
    config = PagedAttentionConfig(pages_per_block=4, kv_splits=1)
    out, v = paged_attention_shrink(
        *cache,
        jnp.int32(1),
        *tables,
        sm_scale=0.25,
        weights=problem.weights,
        config=config,
        interpret=interpret,
    )
    plain = paged_attention(*cache, jnp.int32(1), sm_scale=0.25, config=config, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain, np.float32))
    want_out, want_v = paged_attention_shrink_reference(
        *cache, jnp.int32(1), *tables, sm_scale=0.25, weights=problem.weights
    )
    assert v.shape == want_v.shape and v.dtype == jnp.float32
    v = np.asarray(v)
    assert np.isfinite(v).all(), "a v element was never written (or read NaN past a rank)"
    assert (v[problem.token_slot < 0] == 0).all() and (v[np.asarray(SEQ_LENS) == 0] == 0).all()
    of_its_out = sgmv_shrink_reference(
        out.reshape(len(SEQ_LENS), -1), *tables, jnp.int32(1), weights=problem.weights
    )
    np.testing.assert_allclose(v, np.asarray(of_its_out), rtol=1e-5, atol=1e-5)
    tol = TOLERANCE[dtype]
    scale = np.abs(np.asarray(want_v)).max()
    np.testing.assert_allclose(v, np.asarray(want_v), rtol=tol, atol=tol * scale)


def test_attention_shrink_with_a_window_is_the_windowed_kernel():
    """The fused o shrink's launch (RunnerConfig.attention_shrink) honours a sliding window:
    its output is windowed paged_attention's bit for bit, and v the reference's shrink of it."""
    from pallas_kernels.paged_attention import (
        paged_attention_shrink,
        paged_attention_shrink_reference,
    )

    cache, tables, problem = _shrink_problem(3, SEQ_LENS, 2, 2, jnp.float32)
    config = PagedAttentionConfig(pages_per_block=4, kv_splits=1)
    launch = dict(sm_scale=0.25, window=3, config=config, interpret=True)
    out, v = paged_attention_shrink(
        *cache, jnp.int32(1), *tables, weights=problem.weights, **launch
    )
    plain = paged_attention(*cache, jnp.int32(1), **launch)
    whole = paged_attention(*cache, jnp.int32(1), sm_scale=0.25, config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert not np.allclose(np.asarray(out), np.asarray(whole))  # rows longer than the window
    want_out, want_v = paged_attention_shrink_reference(
        *cache, jnp.int32(1), *tables, sm_scale=0.25, weights=problem.weights, window=3
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(v), np.asarray(want_v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_attention_shrink_reads_fp8_pools_as_the_plain_kernel(cache_dtype):
    """The fused o shrink's launch loads K/V as paged_attention does: over fp8 pools (bf16
    query and A rows) its output is paged_attention's bit for bit, v the shrink of it."""
    from pallas_kernels.paged_attention import paged_attention_shrink
    from pallas_kernels.sgmv import sgmv_shrink_reference

    (q, k_pool, v_pool, *table), tables, problem = _shrink_problem(5, SEQ_LENS, 2, 2, jnp.bfloat16)
    cache = (q, k_pool.astype(cache_dtype), v_pool.astype(cache_dtype), *table)
    launch = dict(
        sm_scale=0.25, config=PagedAttentionConfig(pages_per_block=4, kv_splits=1), interpret=True
    )
    out, v = paged_attention_shrink(
        *cache, jnp.int32(1), *tables, weights=problem.weights, **launch
    )
    plain = paged_attention(*cache, jnp.int32(1), **launch)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain, np.float32))
    assert np.isfinite(np.asarray(v)).all()
    of_its_out = sgmv_shrink_reference(
        out.reshape(len(SEQ_LENS), -1), *tables, jnp.int32(1), weights=problem.weights
    )
    np.testing.assert_allclose(np.asarray(v), np.asarray(of_its_out), rtol=1e-5, atol=1e-5)


def test_attention_shrink_needs_one_split_and_names_bad_fields():
    from pallas_kernels.paged_attention import paged_attention_shrink

    cache, tables, problem = _shrink_problem(3, (5, 9, 0), 2, 2, jnp.float32)
    kwargs = dict(sm_scale=0.25, weights=problem.weights, interpret=True)
    with pytest.raises(ConfigError, match="one kv split"):
        paged_attention_shrink(
            *cache,
            0,
            *tables,
            config=PagedAttentionConfig(pages_per_block=4, kv_splits=3),
            **kwargs,
        )
    a_pool, a_pages, ranks, slot = tables
    with pytest.raises(ConfigError, match=r"a_pool must be \(L, P, R, 64\)"):
        paged_attention_shrink(*cache, 0, a_pool[..., :32], a_pages, ranks, slot, **kwargs)
    with pytest.raises(ConfigError, match="token_slot"):
        paged_attention_shrink(*cache, 0, a_pool, a_pages, ranks, slot[:2], **kwargs)


def test_attention_shrink_lowers_in_a_layer_scan():
    """Lowered for an H100 at the 7B decode shapes (32 heads of 128, rank 16 in one page of 16,
    bf16, 32 rows), the layer the scan's counter: one Triton kernel, named for the shrink."""
    from pallas_kernels.paged_attention import paged_attention_shrink
    from tests.test_sgmv import make_problem

    rng = np.random.default_rng(2)
    k_pool, v_pool, page_table, seq_lens, _, _ = make_cache(
        rng,
        [40] * 32,
        page_size=16,
        num_layers=2,
        num_kv_heads=32,
        head_dim=128,
        max_pages_per_seq=4,
        dtype=jnp.bfloat16,
    )
    q = jnp.asarray(rng.standard_normal((32, 32, 128)), jnp.bfloat16)
    problem = make_problem(
        2,
        num_tokens=32,
        in_width=4096,
        out_widths=(4096,),
        rows_per_page=16,
        max_pages=1,
        num_layers=2,
        dtype=jnp.bfloat16,
    )
    tables = (problem.a_pool, problem.a_pages, problem.ranks, jnp.asarray(problem.token_slot))

    def layers(q, *operands):
        def body(carry, layer):
            out, v = paged_attention_shrink(
                q, *operands[:4], layer, *operands[4:], sm_scale=0.1, weights=problem.weights
            )
            return carry, (out, v)

        return jax.lax.scan(body, 0, jnp.arange(2, dtype=jnp.int32))

    text = lower_for_gpu(layers, q, k_pool, v_pool, page_table, seq_lens, *tables)
    assert triton_kernels(text) == 1
    assert "_shrink" in text

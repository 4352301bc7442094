"""SGMV LoRA shrink / expand over the paged adapter pool (layout: pallas_kernels/layout.py).

shrink:  v[t, g, :r] = x[t] @ A_{w_g}[slot_t]            (T, G, MP*R), float32
expand:  y[t, cols_g] += scale[slot_t, w_g] * v[t, g, :r] @ B_{w_g}[slot_t]

G is the number of weights in a fused module group (q|k|v: 3, gate|up: 2, o and down: 1); they
share the input x (so one shrink) and write column slices of one fused output (so one expand).
Tokens whose slot is NO_ADAPTER get v = 0 and leave y untouched.

This file holds the plain-jnp references; the Pallas Triton kernels sit beside them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gather_rows(pool, layer, pages, ranks):
    """Rows of one weight for every token: (T, MP*R, W) float32, rows >= rank zeroed.

    pool: (L, P, R, W); pages: (T, MP) int32; ranks: (T,) int32.
    """
    _, _, rows_per_page, width = pool.shape
    t, mp = pages.shape
    rows = jnp.take(pool[layer], pages, axis=0).reshape(t, mp * rows_per_page, width)
    keep = jnp.arange(mp * rows_per_page)[None, :] < ranks[:, None]
    return jnp.where(keep[:, :, None], rows.astype(jnp.float32), 0.0)


def sgmv_shrink_reference(
    # inputs
    x: jax.Array,  # (T, in) activations
    a_pool: jax.Array,  # (L, P, R, in) A rank-rows
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],  # weight indices of the group, e.g. (0, 1, 2) for q|k|v
) -> jax.Array:  # (T, G, MP*R) float32
    valid = token_slot >= 0
    slot = jnp.where(valid, token_slot, 0)
    outs = []
    for w in weights:
        r = jnp.where(valid, ranks[slot, w], 0)
        rows = _gather_rows(a_pool, layer, a_pages[slot, w], r)
        outs.append(jnp.einsum("ti,tri->tr", x.astype(jnp.float32), rows,
                               precision=jax.lax.Precision.HIGHEST))
    return jnp.stack(outs, axis=1)


def sgmv_expand_reference(
    # inputs
    y: jax.Array,  # (T, sum of out widths) the fused base output, updated
    v: jax.Array,  # (T, G, MP*R) float32 from shrink
    b_pools: tuple[jax.Array, ...],  # G pools, (L, P, R, out_g) each (may repeat one array)
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
) -> jax.Array:  # (T, sum of out widths), y's dtype
    valid = token_slot >= 0
    slot = jnp.where(valid, token_slot, 0)
    y32 = y.astype(jnp.float32)
    col = 0
    for g, w in enumerate(weights):
        pool = b_pools[g]
        width = pool.shape[-1]
        r = jnp.where(valid, ranks[slot, w], 0)
        rows = _gather_rows(pool, layer, b_pages[slot, w], r)
        delta = jnp.einsum("tr,tro->to", v[:, g, :].astype(jnp.float32), rows,
                           precision=jax.lax.Precision.HIGHEST)
        delta = delta * jnp.where(valid, scales[slot, w], 0.0)[:, None]
        y32 = y32.at[:, col:col + width].add(delta)
        col += width
    if col != y.shape[-1]:
        raise ValueError(f"expand: the group's widths add up to {col}, y has {y.shape[-1]} columns")
    return y32.astype(y.dtype)

"""The residual add after a split-K projection and the RMSNorm after it, in one launch.

    h' = h + round(sum_s parts[s])
    x  = round(scale[layer]) * round(h' * rsqrt(mean(h'^2) + eps))

With ``out_scales`` (Gemma 2 / 3's sandwich norms: an RMSNorm of o's and down's outputs
before the residual add) the rounded sum o = round(sum_s parts[s]) is normalized first, with
the scale row of ``out_layer`` (down's own layer where the next norm reads layer + 1's):

    h' = h + round(out_scale[out_layer]) * round(o * rsqrt(mean(o^2) + eps))

``parts`` are ``lora_matmul``'s float32 split-K partials of o or down (``partials=True``;
one part, already rounded, where it did not split), ``scale`` the layer-stacked RMSNorm scales,
read in place at a traced ``layer``. Every rounding is the model's: the partials' sum is rounded
to h's dtype once, as ``lora_matmul`` rounds its output; the add, the normalization (float32)
and the product by the scale each round to h's dtype, as ``jaxlora.model.RMSNorm`` does.

Why: in a decode step whose projections all run in ``lora_matmul`` XLA runs, per layer, one
fusion for o's partial sums + residual + post-attention norm (3.6 us at batch 32 on the H200),
one for down's partial sums + residual (2.6 us) and one for the next layer's input norm (1.8
us), and per scan iteration a slice of each norm's scales (1.7 us each): about 0.31 ms of a
5.5 ms step (docs/BENCHMARKS.md, "Where a decode step's time goes", thirty-first session).
Two launches a layer of this kernel replace them (``RunnerConfig.residual_norm="pallas"``,
the default since the thirty-third session): its 64 launches a batch-32 step took 0.25 ms
(3.85 us each with 8 warps), and batch-32 and -64 steps ran 1.1-1.8% shorter on the H200.

Grid: one program per token row; each reads its row's parts, h and the layer's scale row
(lanes padded to a power of two and masked) and writes h' and x.

``residual_rms_norm_shrink`` (``RunnerConfig.norm_shrink``, opt-in, not yet timed on a GPU)
also runs the LoRA shrink of the projection group that reads x (q|k|v after the next layer's
input norm, gate|up after the post-attention norm), ``sgmv_shrink``'s per-token decode regime
with one token's ``rows`` rank rows a program: grid (T, rank-row chunks), every chunk
normalizing its row again (parts from L2) and chunk 0 writing h' and x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.errors import ConfigError
from pallas_kernels import sgmv as sgmv_ops
from pallas_kernels.paged_attention import _layer_scalar
from pallas_kernels.sgmv import _next_pow2

_WHERE = "pallas_kernels/residual_norm.py"


def _check_out_scales(out_scales, scales, fn):
    if out_scales is not None and out_scales.shape != scales.shape:
        raise ConfigError(
            f"{_WHERE} {fn}: out_scales must be {tuple(scales.shape)} (layer-stacked norm "
            f"scales of the projection's output, as scales), got shape {out_scales.shape}"
        )


def _check_inputs(h, parts, scales, fn):
    if h.ndim != 2:
        raise ConfigError(f"{_WHERE} {fn}: h must be (T, D), got shape {h.shape}")
    if parts.ndim != 3 or parts.shape[1:] != h.shape:
        raise ConfigError(
            f"{_WHERE} {fn}: parts must be (S, {h.shape[0]}, {h.shape[1]}) (split-K partials "
            f"of h's shape), got shape {parts.shape}"
        )
    if scales.ndim != 2 or scales.shape[1] != h.shape[1]:
        raise ConfigError(
            f"{_WHERE} {fn}: scales must be (L, {h.shape[1]}) (layer-stacked norm scales), "
            f"got shape {scales.shape}"
        )


def rms_norm(x, scale, eps: float, dtype):
    """RMSNorm's arithmetic: float32 normalization, rounded to dtype, times the rounded scale
    (``jaxlora.model.RMSNorm`` runs it; so does this kernel's reference)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * x32.astype(dtype)


def residual_rms_norm_reference(
    # inputs
    h: jax.Array,  # (T, D) the residual stream
    parts: jax.Array,  # (S, T, D) a projection's split-K partials (float32, or one rounded part)
    scales: jax.Array,  # (L, D) layer-stacked RMSNorm scales
    layer: jax.Array | int,  # () int32
    *,
    eps: float,
    out_scales: jax.Array | None = None,  # (L, D) sandwich norm of the parts' sum, or None
    out_layer: jax.Array | int | None = None,  # () int32 out_scales' row (None: layer)
) -> tuple[jax.Array, jax.Array]:  # h' (T, D), x (T, D), both h's dtype
    """What the model computes with XLA: ``h + sum(parts)`` (``h + RMSNorm(sum(parts))``
    with out_scales, at out_layer: down's norm is its own layer's, the next norm the next
    layer's) and ``RMSNorm`` of it."""
    _check_inputs(h, parts, scales, "residual_rms_norm_reference")
    _check_out_scales(out_scales, scales, "residual_rms_norm_reference")
    dtype = h.dtype
    out = parts.astype(jnp.float32).sum(axis=0).astype(dtype)
    if out_scales is not None:
        at = _layer_scalar(layer if out_layer is None else out_layer, scales.shape[0])
        out = rms_norm(out, out_scales[at], eps, dtype)
    h_new = h + out
    return h_new, rms_norm(h_new, scales[_layer_scalar(layer, scales.shape[0])], eps, dtype)


def _residual_norm_kernel(
    # inputs
    layer_ref,  # (1,) int32, or (2,) [scales' row, out_scales' row] with out_scales
    h_ref,  # (T, D)
    parts_ref,  # (S, T, D)
    scales_ref,  # (L, D)
    *refs,  # [out_scales_ref (L, D)] then the outputs:
    # h_out_ref (T, D) h + the parts' rounded sum (normalized first with out_scales)
    # x_out_ref (T, D) RMSNorm of it
    lanes: int,
    eps: float,
):
    out_scales_ref = refs[0] if len(refs) == 3 else None
    h_out_ref, x_out_ref = refs[-2:]
    row = pl.program_id(0)
    h_new, x = _residual_norm_row(
        layer_ref, h_ref, parts_ref, scales_ref, row, lanes, eps, out_scales_ref
    )
    _store_row(h_out_ref, row, h_new, lanes)
    _store_row(x_out_ref, row, x, lanes)


def _row_columns(lanes: int, width: int):
    """A row's column index and its mask (None: every lane is a column)."""
    if lanes == width:
        # A power-of-two width: one contiguous slice, which Triton loads in vectors (a gather's
        # indices it cannot prove contiguous: 193 scalar loads a thread at 4096 x 4 parts).
        return pl.ds(0, width), None
    column = jax.lax.broadcasted_iota(jnp.int32, (lanes,), 0)
    ok = column < width
    # Padding lanes point past the row (masked: never loaded, never stored).
    return jnp.where(ok, column, width), ok


def _residual_norm_row(
    layer_ref, h_ref, parts_ref, scales_ref, row, lanes, eps, out_scales_ref=None
):
    """Row ``row``'s h' and x, (lanes,) each in h's dtype (padding lanes 0)."""
    width = h_ref.shape[1]
    dtype = h_ref.dtype
    column, ok = _row_columns(lanes, width)
    delta = jnp.zeros((lanes,), jnp.float32)
    for part in range(parts_ref.shape[0]):
        at = parts_ref.at[jnp.int32(part), row, column]
        delta += _load(at, ok).astype(jnp.float32)
    delta = delta.astype(dtype)
    if out_scales_ref is not None:
        delta = _rms_norm_row(delta, out_scales_ref.at[layer_ref[1], column], ok, width, eps)
    h = _load(h_ref.at[row, column], ok).astype(jnp.float32)
    h_new = (h + delta.astype(jnp.float32)).astype(dtype)
    return h_new, _rms_norm_row(h_new, scales_ref.at[layer_ref[0], column], ok, width, eps)


def _rms_norm_row(value, scale_at, ok, width, eps):
    """``rms_norm`` of one row (lanes,) in its dtype; scale_at: its scale row's ref."""
    dtype = value.dtype
    x32 = value.astype(jnp.float32)
    mean_square = jnp.sum(x32 * x32) / width  # padding lanes hold 0
    normed = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(dtype).astype(jnp.float32)
    scale = _load(scale_at, ok)
    return (scale.astype(dtype).astype(jnp.float32) * normed).astype(dtype)


def _store_row(ref, row, value, lanes):
    column, ok = _row_columns(lanes, ref.shape[1])
    pltriton.store(ref.at[row, column], value, **({} if ok is None else {"mask": ok}))


def _load(at, ok):
    if ok is None:
        return pltriton.load(at)
    return pltriton.load(at, mask=ok, other=0)


def residual_rms_norm(
    # inputs
    h: jax.Array,  # (T, D) the residual stream
    parts: jax.Array,  # (S, T, D) a projection's split-K partials (float32, or one rounded part)
    scales: jax.Array,  # (L, D) layer-stacked RMSNorm scales
    layer: jax.Array | int,  # () int32 (clamped to the stack)
    *,
    eps: float,
    out_scales: jax.Array | None = None,  # (L, D) sandwich norm of the parts' sum, or None
    out_layer: jax.Array | int | None = None,  # () int32 out_scales' row (None: layer)
    num_warps: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # h' (T, D), x (T, D), both h's dtype
    """``residual_rms_norm_reference`` as one Pallas Triton launch (see the module docstring).
    With ``out_scales`` a row takes a second reduction (its parts' sum normalized before the
    add) and reads a second scale row: one launch where XLA runs the sandwich norm, the add
    and the next norm as fusions of their own. In gemma-2-9b's batch-32 decode step on an H100
    (forty-sixth session) its 84 launches took 4.8 us each and the step 1.6-2.2% less time
    than with XLA's norms, with the same tokens (docs/BENCHMARKS.md).

    One program a row moves S + 2 rows (about 80 KB at 4 float32 parts of 4096 columns) with
    one SM: ``num_warps`` sets how many loads it has in flight. 16 by default (8 columns a
    thread at 4096): in the 7B batch-32 decode step on the H200 its 64 launches took 3.85 us
    each with 8 warps, and the step was 0.4-0.9% shorter with 16 than with 8 (thirty-third
    session). The compiled SASS loads in 128-bit vectors with any of them (20 a thread with 8
    warps, 40 with 4)."""
    _check_inputs(h, parts, scales, "residual_rms_norm")
    _check_out_scales(out_scales, scales, "residual_rms_norm")
    num_tokens, width = h.shape
    if num_tokens == 0:
        return h, h
    lanes = _next_pow2(width)
    shape = jax.ShapeDtypeStruct(h.shape, h.dtype)
    rows = [_layer_scalar(layer, scales.shape[0])]
    if out_scales is not None:
        rows.append(_layer_scalar(layer if out_layer is None else out_layer, scales.shape[0]))
    layer = jnp.stack(rows).astype(jnp.int32)
    sandwich = () if out_scales is None else (out_scales,)
    return pl.pallas_call(
        functools.partial(_residual_norm_kernel, lanes=lanes, eps=float(eps)),
        grid=(num_tokens,),
        out_shape=(shape, shape),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=(
            f"residual_rms_norm{'_sandwich' if sandwich else ''}_s{parts.shape[0]}_d{width}"
            f"_w{num_warps}"
        ),
    )(layer, h, parts, scales, *sandwich)


# ------------------------------------------------------------------------------------------------
# with the LoRA shrink of the projection group that reads x
# ------------------------------------------------------------------------------------------------


def _check_shrink_inputs(
    x_width, num_layers, a_pool, a_pages, ranks, token_slot, num_tokens, weights, fn
):
    sgmv_ops.check_fused_shrink_operands(
        fn,
        a_pool,
        a_pages,
        ranks,
        token_slot,
        weights,
        num_tokens=num_tokens,
        width=x_width,
        num_layers=num_layers,
        expected="the scales' layers, h's width",
        where=_WHERE,
    )


def residual_rms_norm_shrink_reference(
    # inputs
    h: jax.Array,  # (T, D) the residual stream
    parts: jax.Array,  # (S, T, D) a projection's split-K partials
    scales: jax.Array,  # (L, D) layer-stacked RMSNorm scales
    layer: jax.Array | int,  # () int32: the norm's scale row and the A rows' layer
    a_pool: jax.Array,  # (L, P, R, D) A rank-rows of the group that reads x
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    *,
    eps: float,
    weights: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:  # h' (T, D), x (T, D), v (T, G, MP*R) float32
    """``residual_rms_norm_reference``, then ``sgmv_shrink_reference`` of its x (both at
    ``layer``, clamped into each stack): the model's norm and the group's LoRA shrink."""
    fn = "residual_rms_norm_shrink_reference"
    _check_inputs(h, parts, scales, fn)
    _check_shrink_inputs(
        h.shape[1], scales.shape[0], a_pool, a_pages, ranks, token_slot, h.shape[0], weights, fn
    )
    h_new, x = residual_rms_norm_reference(h, parts, scales, layer, eps=eps)
    a_layer = _layer_scalar(layer, a_pool.shape[0])
    v = sgmv_ops.sgmv_shrink_reference(
        x, a_pool, a_pages, ranks, token_slot, a_layer, weights=weights
    )
    return h_new, x, v


def _residual_norm_shrink_kernel(
    # inputs
    layer_ref,  # (1,) int32
    h_ref,  # (T, D)
    parts_ref,  # (S, T, D)
    scales_ref,  # (L, D)
    pool_ref,  # (L*P*R, D) A rank-rows of every layer and page
    pages_ref,  # (S, 7, MP) int32
    ranks_ref,  # (S, 7) int32
    slot_ref,  # (T,) int32 each token's slot, -1 = no adapter
    # outputs
    h_out_ref,  # (T, D) h + the parts' rounded sum (written by chunk 0)
    x_out_ref,  # (T, D) RMSNorm of it (written by chunk 0)
    v_ref,  # (T, G*MP*R) float32 the shrink of x
    *,
    lanes: int,
    eps: float,
    rows: int,
    rank_rows: dict,
):
    width = h_ref.shape[1]
    row, chunk, col_ok, live, a_i, out_i, any_live = sgmv_ops.chunk_rank_rows(
        rows, slot_ref, layer_ref, pool_ref, pages_ref, ranks_ref, rank_rows
    )
    interpret = rank_rows["interpret"]

    # Chunk 0 of a row writes h' and x; every chunk with a live rank row normalizes the row
    # itself (the norm needs the whole row, so a chunk cannot take another's x).
    @pl.when((chunk == 0) | any_live)
    def _compute():
        h_new, x = _residual_norm_row(layer_ref, h_ref, parts_ref, scales_ref, row, lanes, eps)

        @pl.when(chunk == 0)
        def _store():
            _store_row(h_out_ref, row, h_new, lanes)
            _store_row(x_out_ref, row, x, lanes)

        k = jax.lax.broadcasted_iota(jnp.int32, (lanes,), 0)
        mask = live[:, None]
        if lanes != width:
            k_ok = k < width
            k = sgmv_ops._idx(k, k_ok, width, interpret)
            mask = mask & k_ok[None, :]
        a = pltriton.load(pool_ref.at[a_i[:, None], k[None, :]], mask=mask, other=0)
        # x as the separate shrink reads it: rounded to h's dtype, products in float32.
        v = jnp.sum(a.astype(jnp.float32) * x.astype(jnp.float32)[None, :], axis=1)
        pltriton.store(v_ref.at[row, out_i], v, mask=col_ok)

    @pl.when((chunk != 0) & jnp.logical_not(any_live))
    def _zeros():
        pltriton.store(v_ref.at[row, out_i], jnp.zeros((rows,), jnp.float32), mask=col_ok)


def residual_rms_norm_shrink(
    # inputs
    h: jax.Array,  # (T, D) the residual stream
    parts: jax.Array,  # (S, T, D) a projection's split-K partials (float32, or one rounded part)
    scales: jax.Array,  # (L, D) layer-stacked RMSNorm scales
    layer: jax.Array | int,  # () int32: the scale row's and the A rows' layer (clamped to each)
    a_pool: jax.Array,  # (L, P, R, D) A rank-rows of the group that reads x
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    *,
    eps: float,
    weights: tuple[int, ...],
    rows: int = 8,
    num_warps: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # h' (T, D), x (T, D), v (T, G, MP*R) float32
    """``residual_rms_norm_shrink_reference`` in one Pallas Triton launch: the residual add and
    RMSNorm of ``residual_rms_norm`` and the LoRA shrink (``sgmv_shrink``'s decode regime: one
    token's ``rows`` rank rows a program) of the projection group that reads x, so that the
    group's shrink needs no launch of its own.

    Grid (T, ceil(G * MP * R / rows)): program (t, c) normalizes row t and dots x with the
    token's rank rows [c * rows, (c + 1) * rows) of the group (rows past a weight's rank, and
    every row of a token without adapter, masked: never loaded, 0 in v). Chunk 0 writes h' and
    x; the others re-read the row's parts (from L2) for the norm, which needs the whole row.
    Where a token has no live row in a chunk, that program writes zeros and reads nothing.

    Why (not yet timed on a GPU): in a batch-32 decode step on the H200 each group's shrink is a
    launch of its own, 4.1-6.5 us for 1.0-2.9 us of A rows at the copy rate (thirty-third
    session's profile): launch and ramp-up dominate. The norm kernel before q|k|v (the next
    layer's input norm) and before gate|up (the post-attention norm) already holds x."""
    fn = "residual_rms_norm_shrink"
    _check_inputs(h, parts, scales, fn)
    num_tokens, width = h.shape
    _check_shrink_inputs(
        width, scales.shape[0], a_pool, a_pages, ranks, token_slot, num_tokens, weights, fn
    )
    if not sgmv_ops._is_pow2(rows):
        raise ConfigError(f"{_WHERE} {fn}: rows must be a power of two >= 1, got {rows}")
    num_layers, pages_per_pool, rows_per_page, _ = a_pool.shape
    rank_rows = sgmv_ops.rank_row_statics(a_pool, a_pages, weights, interpret)
    rank_cols = rank_rows["rank_cols"]
    columns = len(weights) * rank_cols
    if num_tokens == 0:
        return h, h, jnp.zeros((0, len(weights), rank_cols), jnp.float32)
    rows = min(rows, _next_pow2(columns))
    lanes = _next_pow2(width)
    shape = jax.ShapeDtypeStruct(h.shape, h.dtype)
    v_shape = jax.ShapeDtypeStruct((num_tokens, columns), jnp.float32)
    layer = _layer_scalar(layer, scales.shape[0]).reshape(1)
    pool_rows = a_pool.reshape(num_layers * pages_per_pool * rows_per_page, width)
    kernel = functools.partial(
        _residual_norm_shrink_kernel,
        lanes=lanes,
        eps=float(eps),
        rows=rows,
        rank_rows=rank_rows,
    )
    h_new, x, v = pl.pallas_call(
        kernel,
        grid=(num_tokens, -(-columns // rows)),
        out_shape=(shape, shape, v_shape),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"residual_rms_norm_shrink_s{parts.shape[0]}_d{width}_rows{rows}_w{num_warps}",
    )(
        layer,
        h,
        parts,
        scales,
        pool_rows,
        a_pages.astype(jnp.int32),
        ranks.astype(jnp.int32),
        token_slot.astype(jnp.int32),
    )
    return h_new, x, v.reshape(num_tokens, len(weights), rank_cols)

"""SwiGLU of the gate|up projection, with the LoRA shrink of down (which reads its output), in
one launch.

    hidden = round(silu(gate) * up)                       (float32, rounded to gate|up's dtype)
    v[t, :r] = hidden[t] @ A_down[slot(t)]                (float32)

``gate_up`` is ``lora_matmul``'s output for the fused gate|up group, (T, 2 I): gate in columns
[0, I), up in [I, 2 I). ``v`` is what ``sgmv_shrink`` returns for the down group, in the page
pool layout of ``pallas_kernels/sgmv.py`` (pages of rank rows, the same page ids in every layer,
rows past an adapter's rank masked, tokens without adapter 0).

Why (``RunnerConfig.swiglu_shrink``, opt-in, thirty-third session, not yet timed on a GPU): in
a batch-32 decode step with many adapters on the H200 down's SGMV shrink took 6.5 us a layer
for 2.6 us of A rows at the copy rate, the costliest of the four shrinks, and SwiGLU another
XLA fusion of 1.8 us (thirty-third session's profile). Here both are one launch.

Grid (T, ceil(MP * R / rows)): program (t, c) computes row t's SwiGLU and dots it with the
token's rank rows [c * rows, (c + 1) * rows) of down; chunk 0 also writes the row of hidden. The
row is walked in power-of-two pieces (11,008 = 4,096 + 4,096 + 2,048 + 512 + 256), each a
contiguous slice that Triton loads in vectors, so no lane is padded or masked. A chunk with no
live rank row writes zeros to v and, unless it is chunk 0, reads nothing; each piece of the
row is loaded and computed once a program.
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

_WHERE = "pallas_kernels/swiglu.py"


# ModelConfig.activation -> the gate's activation, in float32.
GATE_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def gated_activation(gate: jax.Array, up: jax.Array, dtype, activation: str = "silu") -> jax.Array:
    """A gated MLP's arithmetic: act(gate) * up in float32, rounded once to dtype
    (``jaxlora.model.MLP`` runs it; SwiGLU's act is SiLU, Gemma's GeGLU the tanh GELU)."""
    if activation not in GATE_ACTIVATIONS:
        raise ConfigError(
            f"{_WHERE}: activation {activation!r}: expected one of {sorted(GATE_ACTIVATIONS)}"
        )
    act = GATE_ACTIVATIONS[activation]
    return (act(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


def silu_mul(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """SwiGLU's arithmetic (``gated_activation`` with SiLU): this kernel and its reference
    compute it; so does ``jaxlora.model.MLP`` for every SiLU model."""
    return gated_activation(gate, up, dtype, "silu")


def swiglu(gate_up: jax.Array) -> jax.Array:
    """SwiGLU of a fused (..., 2 I) gate|up output, in its dtype."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return silu_mul(gate, up, gate_up.dtype)


def _check_inputs(gate_up, a_pool, a_pages, ranks, token_slot, weights, fn):
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ConfigError(
            f"{_WHERE} {fn}: gate_up must be (T, 2 I) (gate, then up), got shape {gate_up.shape}"
        )
    sgmv_ops.check_fused_shrink_operands(
        fn,
        a_pool,
        a_pages,
        ranks,
        token_slot,
        weights,
        num_tokens=gate_up.shape[0],
        width=gate_up.shape[1] // 2,
        expected="down's input width, half of gate_up's",
        where=_WHERE,
    )


def swiglu_shrink_reference(
    # inputs
    gate_up: jax.Array,  # (T, 2 I) gate, then up
    a_pool: jax.Array,  # (L, P, R, I) A rank-rows of down
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    layer: jax.Array | int,  # () int32 (clamped to the pool's layers)
    *,
    weights: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:  # hidden (T, I) gate_up's dtype, v (T, G, MP*R) float32
    """The model's SwiGLU, then ``sgmv_shrink_reference`` of it."""
    _check_inputs(gate_up, a_pool, a_pages, ranks, token_slot, weights, "swiglu_shrink_reference")
    hidden = swiglu(gate_up)
    layer = _layer_scalar(layer, a_pool.shape[0])
    v = sgmv_ops.sgmv_shrink_reference(
        hidden, a_pool, a_pages, ranks, token_slot, layer, weights=weights
    )
    return hidden, v


def row_pieces(width: int, block: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) pieces that tile [0, width): ``block``-wide ones (a power of two), then
    the binary digits of the rest, largest first; every size a power of two."""
    pieces, offset = [], 0
    while width - offset >= block:
        pieces.append((offset, block))
        offset += block
    size = block // 2
    while offset < width:
        if width - offset >= size:
            pieces.append((offset, size))
            offset += size
        size //= 2
    return tuple(pieces)


def _swiglu_shrink_kernel(
    # inputs
    layer_ref,  # (1,) int32
    gate_up_ref,  # (T, 2 I)
    pool_ref,  # (L*P*R, I) A rank-rows of every layer and page
    pages_ref,  # (S, 7, MP) int32
    ranks_ref,  # (S, 7) int32
    slot_ref,  # (T,) int32 each token's slot, -1 = no adapter
    # outputs
    hidden_ref,  # (T, I) SwiGLU of the row (written by chunk 0)
    v_ref,  # (T, G*MP*R) float32 the shrink of hidden
    *,
    pieces: tuple[tuple[int, int], ...],
    rows: int,
    rank_rows: dict,
):
    width = hidden_ref.shape[1]
    dtype = hidden_ref.dtype
    row, chunk, col_ok, live, a_i, out_i, any_live = sgmv_ops.chunk_rank_rows(
        rows, slot_ref, layer_ref, pool_ref, pages_ref, ranks_ref, rank_rows
    )

    def hidden_piece(offset, size):
        gate = pltriton.load(gate_up_ref.at[row, pl.ds(offset, size)])
        up = pltriton.load(gate_up_ref.at[row, pl.ds(width + offset, size)])
        return silu_mul(gate, up, dtype)

    # Each piece of the row is computed once: chunk 0 stores it, and every chunk with a live
    # rank row dots it with its A rows (masked rows load nothing and add 0).
    @pl.when((chunk == 0) | any_live)
    def _compute():
        v = jnp.zeros((rows,), jnp.float32)
        for offset, size in pieces:
            columns = pl.ds(offset, size)
            hidden = hidden_piece(offset, size)

            @pl.when(chunk == 0)
            def _store(columns=columns, hidden=hidden):
                pltriton.store(hidden_ref.at[row, columns], hidden)

            # hidden as the separate shrink reads it: rounded to its dtype, products in float32.
            k = offset + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
            a = pltriton.load(pool_ref.at[a_i[:, None], k[None, :]], mask=live[:, None], other=0)
            v += jnp.sum(a.astype(jnp.float32) * hidden.astype(jnp.float32)[None, :], axis=1)
        pltriton.store(v_ref.at[row, out_i], v, mask=col_ok)

    @pl.when((chunk != 0) & jnp.logical_not(any_live))
    def _zeros():
        pltriton.store(v_ref.at[row, out_i], jnp.zeros((rows,), jnp.float32), mask=col_ok)


def swiglu_shrink(
    # inputs
    gate_up: jax.Array,  # (T, 2 I) gate, then up
    a_pool: jax.Array,  # (L, P, R, I) A rank-rows of down
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    layer: jax.Array | int,  # () int32 (clamped to the pool's layers)
    *,
    weights: tuple[int, ...],
    rows: int = 8,
    block: int = 4096,
    num_warps: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # hidden (T, I) gate_up's dtype, v (T, G, MP*R) float32
    """``swiglu_shrink_reference`` as one Pallas Triton launch (see the module docstring):
    ``rows`` rank rows a program, the row walked in pieces of at most ``block`` columns."""
    fn = "swiglu_shrink"
    _check_inputs(gate_up, a_pool, a_pages, ranks, token_slot, weights, fn)
    for name, value in (("rows", rows), ("block", block)):
        if not sgmv_ops._is_pow2(value):
            raise ConfigError(f"{_WHERE} {fn}: {name} must be a power of two >= 1, got {value}")
    num_tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    num_layers, pages_per_pool, rows_per_page, _ = a_pool.shape
    rank_rows = sgmv_ops.rank_row_statics(a_pool, a_pages, weights, interpret)
    rank_cols = rank_rows["rank_cols"]
    columns = len(weights) * rank_cols
    hidden_shape = jax.ShapeDtypeStruct((num_tokens, width), gate_up.dtype)
    if num_tokens == 0:
        return jnp.zeros(hidden_shape.shape, gate_up.dtype), jnp.zeros(
            (0, len(weights), rank_cols), jnp.float32
        )
    rows = min(rows, _next_pow2(columns))
    layer = _layer_scalar(layer, num_layers).reshape(1)
    kernel = functools.partial(
        _swiglu_shrink_kernel,
        pieces=row_pieces(width, block),
        rows=rows,
        rank_rows=rank_rows,
    )
    hidden, v = pl.pallas_call(
        kernel,
        grid=(num_tokens, -(-columns // rows)),
        out_shape=(hidden_shape, jax.ShapeDtypeStruct((num_tokens, columns), jnp.float32)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"swiglu_shrink_i{width}_rows{rows}_b{block}_w{num_warps}",
    )(
        layer,
        gate_up,
        a_pool.reshape(num_layers * pages_per_pool * rows_per_page, width),
        a_pages.astype(jnp.int32),
        ranks.astype(jnp.int32),
        token_slot.astype(jnp.int32),
    )
    return hidden, v.reshape(num_tokens, len(weights), rank_cols)

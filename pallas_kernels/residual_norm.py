"""The residual add after a split-K projection and the RMSNorm after it, in one launch.

    h' = h + round(sum_s parts[s])
    x  = round(scale[layer]) * round(h' * rsqrt(mean(h'^2) + eps))

``parts`` are ``lora_matmul``'s float32 split-K partials of o or down (``partials=True``;
one part, already rounded, where it did not split), ``scale`` the layer-stacked RMSNorm scales,
read in place at a traced ``layer``. Every rounding is the model's: the partials' sum is rounded
to h's dtype once, as ``lora_matmul`` rounds its output; the add, the normalization (float32)
and the product by the scale each round to h's dtype, as ``jaxlora.model.RMSNorm`` does.

Why: in a decode step whose projections all run in ``lora_matmul`` XLA runs, per layer, one
fusion for o's partial sums + residual + post-attention norm (3.6 us at batch 32 on the H200),
one for down's partial sums + residual (2.6 us) and one for the next layer's input norm (1.8
us), and per scan iteration a slice of each norm's scales (1.7 us each): about 0.5 ms of a
5.5 ms step (docs/BENCHMARKS.md, "Where a decode step's time goes", thirty-first session).
Two launches a layer of this kernel replace them (``RunnerConfig.residual_norm="pallas"``,
off by default: built in the thirty-second session without GPU time left to measure it).

Grid: one program per token row; each reads its row's parts, h and the layer's scale row
(lanes padded to a power of two and masked) and writes h' and x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.errors import ConfigError
from pallas_kernels.paged_attention import _layer_scalar
from pallas_kernels.sgmv import _next_pow2

_WHERE = "pallas_kernels/residual_norm.py"


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
) -> tuple[jax.Array, jax.Array]:  # h' (T, D), x (T, D), both h's dtype
    """What the model computes with XLA: ``h + sum(parts)`` and ``RMSNorm`` of it."""
    _check_inputs(h, parts, scales, "residual_rms_norm_reference")
    dtype = h.dtype
    h_new = h + parts.astype(jnp.float32).sum(axis=0).astype(dtype)
    scale = scales[_layer_scalar(layer, scales.shape[0])]
    return h_new, rms_norm(h_new, scale, eps, dtype)


def _residual_norm_kernel(
    # inputs
    layer_ref,  # (1,) int32
    h_ref,  # (T, D)
    parts_ref,  # (S, T, D)
    scales_ref,  # (L, D)
    # outputs
    h_out_ref,  # (T, D) h + the parts' rounded sum
    x_out_ref,  # (T, D) RMSNorm of it
    *,
    lanes: int,
    eps: float,
):
    row = pl.program_id(0)
    width = h_ref.shape[1]
    dtype = h_out_ref.dtype
    if lanes == width:
        # A power-of-two width: one contiguous slice, which Triton loads in vectors (a gather's
        # indices it cannot prove contiguous: 193 scalar loads a thread at 4096 x 4 parts).
        column, ok = pl.ds(0, width), None
    else:
        column = jax.lax.broadcasted_iota(jnp.int32, (lanes,), 0)
        ok = column < width
        # Padding lanes point past the row (masked: never loaded, never stored).
        column = jnp.where(ok, column, width)
    masked = {} if ok is None else {"mask": ok}
    delta = jnp.zeros((lanes,), jnp.float32)
    for part in range(parts_ref.shape[0]):
        at = parts_ref.at[jnp.int32(part), row, column]
        delta += _load(at, ok).astype(jnp.float32)
    h = _load(h_ref.at[row, column], ok).astype(jnp.float32)
    h_new = (h + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
    x32 = h_new.astype(jnp.float32)
    mean_square = jnp.sum(x32 * x32) / width  # padding lanes hold 0
    normed = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(dtype).astype(jnp.float32)
    scale = _load(scales_ref.at[layer_ref[0], column], ok)
    x = (scale.astype(dtype).astype(jnp.float32) * normed).astype(dtype)
    pltriton.store(h_out_ref.at[row, column], h_new, **masked)
    pltriton.store(x_out_ref.at[row, column], x, **masked)


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
    num_warps: int = 8,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # h' (T, D), x (T, D), both h's dtype
    """``residual_rms_norm_reference`` as one Pallas Triton launch (see the module docstring).

    One program a row moves S + 2 rows (about 80 KB at 4 float32 parts of 4096 columns) with
    one SM: ``num_warps`` sets how many loads it has in flight. 8 by default (16 columns a
    thread at 4096): a guess, not yet timed; the compiled SASS loads in 128-bit vectors either
    way (20 a thread with 8 warps, 40 with 4)."""
    _check_inputs(h, parts, scales, "residual_rms_norm")
    num_tokens, width = h.shape
    if num_tokens == 0:
        return h, h
    lanes = _next_pow2(width)
    shape = jax.ShapeDtypeStruct(h.shape, h.dtype)
    layer = _layer_scalar(layer, scales.shape[0]).reshape(1)
    return pl.pallas_call(
        functools.partial(_residual_norm_kernel, lanes=lanes, eps=float(eps)),
        grid=(num_tokens,),
        out_shape=(shape, shape),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"residual_rms_norm_s{parts.shape[0]}_d{width}_w{num_warps}",
    )(layer, h, parts, scales)

"""pallas_kernels/residual_norm.py: the residual add after a split-K projection and the RMSNorm
after it, in one launch, against its reference and against the model's own modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.errors import ConfigError
from jaxlora.model import RMSNorm
from pallas_kernels.residual_norm import (
    residual_rms_norm,
    residual_rms_norm_reference,
    residual_rms_norm_shrink,
    residual_rms_norm_shrink_reference,
)
from pallas_kernels.sgmv import sgmv_shrink_reference
from tests.gpu_lowering import lower_for_gpu, triton_kernels
from tests.test_sgmv import make_problem

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]

# One rounding step of the dtype: the sum of the parts and the norm's mean may round either way
# where the kernel's order of float32 additions differs from XLA's.
TOL = {"float32": 1e-5, "bfloat16": 1.6e-2}


def _inputs(rng, tokens, width, parts, layers, dtype):
    h = jnp.asarray(rng.normal(size=(tokens, width)) * 2, dtype)
    # float32 partials of a split-K projection, or the one rounded part of an unsplit one.
    part_dtype = jnp.float32 if parts > 1 else dtype
    p = jnp.asarray(rng.normal(size=(parts, tokens, width)), part_dtype)
    scales = jnp.asarray(rng.normal(size=(layers, width)) + 1, dtype)
    return h, p, scales


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "tokens, width, parts",
    [(1, 64, 1), (5, 96, 4), (13, 200, 2), (32, 4096, 4), (3, 4096, 8)],
)
def test_kernel_matches_reference(tokens, width, parts, dtype, interpret):
    rng = np.random.default_rng(tokens * 1000 + width + parts)
    h, p, scales = _inputs(rng, tokens, width, parts, 5, jnp.dtype(dtype))
    layer = jnp.int32(int(rng.integers(5)))
    got = jax.jit(
        lambda *a: residual_rms_norm(*a, eps=1e-5, interpret=interpret),
    )(h, p, scales, layer)
    want = residual_rms_norm_reference(h, p, scales, layer, eps=1e-5)
    for g, w, name in zip(got, want, ("h", "x"), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=TOL[dtype], atol=TOL[dtype]
        )
    # Every element written: no output is left as whatever the buffer held.
    assert np.isfinite(np.asarray(got[1], np.float32)).all()


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens, width, parts", [(5, 96, 4), (3, 4096, 8), (2, 200, 1)])
def test_sandwich_kernel_matches_reference(tokens, width, parts, dtype, interpret):
    """out_scales (Gemma 2 / 3's sandwich norms): the parts' rounded sum is normalized with
    out_scales' row at out_layer before the add, the next norm with scales' row at layer (the
    model's last norm of a layer reads down's own layer and the next layer's input norm)."""
    rng = np.random.default_rng(tokens * 7 + width + parts)
    h, p, scales = _inputs(rng, tokens, width, parts, 5, jnp.dtype(dtype))
    out_scales = jnp.asarray(rng.normal(size=scales.shape) + 1, scales.dtype)
    layer, out_layer = jnp.int32(3), jnp.int32(2)
    got = jax.jit(
        lambda h, p, scales, layer, out_scales: residual_rms_norm(
            h,
            p,
            scales,
            layer,
            eps=1e-6,
            out_scales=out_scales,
            out_layer=out_layer,
            interpret=interpret,
        )
    )(h, p, scales, layer, out_scales)
    want = residual_rms_norm_reference(
        h, p, scales, layer, eps=1e-6, out_scales=out_scales, out_layer=out_layer
    )
    plain = residual_rms_norm_reference(h, p, scales, layer, eps=1e-6)
    for g, w, name in zip(got, want, ("h", "x"), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=TOL[dtype], atol=TOL[dtype]
        )
    # The sandwich norm changes h' (so the comparison above can fail), and reads out_layer's row.
    assert np.abs(np.asarray(got[0], np.float32) - np.asarray(plain[0], np.float32)).max() > 0.1
    other = residual_rms_norm_reference(
        h, p, scales, layer, eps=1e-6, out_scales=out_scales, out_layer=layer
    )
    assert np.abs(np.asarray(want[0], np.float32) - np.asarray(other[0], np.float32)).max() > 0.1


def test_sandwich_reference_is_the_models_norm_add_and_norm():
    """With out_scales the reference is jaxlora.model's sandwich layer: RMSNorm of the rounded
    projection output (attn_output_norm / mlp_output_norm), the add, the next RMSNorm."""
    rng = np.random.default_rng(4)
    h, p, scales = _inputs(rng, 7, 96, 4, 3, jnp.bfloat16)
    out_scales = jnp.asarray(rng.normal(size=scales.shape) + 1, jnp.bfloat16)
    h_new, x = residual_rms_norm_reference(
        h, p, scales, 2, eps=1e-6, out_scales=out_scales, out_layer=0
    )
    norm = RMSNorm(1e-6, jnp.bfloat16, jnp.bfloat16)
    out = norm.apply({"params": {"scale": out_scales[0]}}, p.sum(axis=0).astype(jnp.bfloat16))
    model_h = h + out
    model_x = norm.apply({"params": {"scale": scales[2]}}, model_h)
    np.testing.assert_array_equal(np.asarray(h_new, np.float32), np.asarray(model_h, np.float32))
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(model_x, np.float32))


def test_reference_is_the_models_residual_add_and_rmsnorm():
    """The reference computes what the model's XLA path does: h + (sum of the partials rounded
    once, as lora_matmul rounds them), then jaxlora.model.RMSNorm with the layer's scale."""
    rng = np.random.default_rng(0)
    h, p, scales = _inputs(rng, 7, 96, 4, 3, jnp.bfloat16)
    h_new, x = residual_rms_norm_reference(h, p, scales, 1, eps=1e-6)
    model_h = h + p.sum(axis=0).astype(jnp.bfloat16)
    norm = RMSNorm(1e-6, jnp.bfloat16, jnp.bfloat16)
    model_x = norm.apply({"params": {"scale": scales[1]}}, model_h)
    np.testing.assert_array_equal(np.asarray(h_new, np.float32), np.asarray(model_h, np.float32))
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(model_x, np.float32))


def test_layer_index_is_traced_and_clamped():
    rng = np.random.default_rng(1)
    h, p, scales = _inputs(rng, 4, 64, 2, 3, jnp.float32)
    fn = jax.jit(lambda layer: residual_rms_norm(h, p, scales, layer, eps=1e-5, interpret=True))
    by_layer = [np.asarray(fn(jnp.int32(i))[1]) for i in range(3)]
    assert not np.allclose(by_layer[0], by_layer[1])  # the scale row follows the layer
    np.testing.assert_array_equal(np.asarray(fn(jnp.int32(7))[1]), by_layer[2])


def test_bad_shapes_name_the_field():
    h = jnp.zeros((4, 64))
    with pytest.raises(ConfigError, match="residual_norm.py residual_rms_norm: parts must be"):
        residual_rms_norm(h, jnp.zeros((2, 4, 32)), jnp.zeros((3, 64)), 0, eps=1e-5)
    with pytest.raises(ConfigError, match="scales must be \\(L, 64\\)"):
        residual_rms_norm(h, jnp.zeros((2, 4, 64)), jnp.zeros((3, 32)), 0, eps=1e-5)
    with pytest.raises(ConfigError, match=r"out_scales must be \(3, 64\) \(layer-stacked"):
        residual_rms_norm(
            h, jnp.zeros((2, 4, 64)), jnp.zeros((3, 64)), 0, eps=1e-5, out_scales=jnp.zeros((2, 64))
        )
    with pytest.raises(ConfigError, match="h must be \\(T, D\\)"):
        residual_rms_norm_reference(
            jnp.zeros(64), jnp.zeros((1, 1, 64)), jnp.zeros((1, 64)), 0, eps=1e-5
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_lowers_for_the_gpu(dtype):
    """The kernel also lowers to Triton for an H100 (tests/gpu_lowering.py), with the layer the
    traced counter of a scan over layers, as the model runs it."""
    rng = np.random.default_rng(2)
    h, p, scales = _inputs(rng, 32, 4096, 4, 3, jnp.dtype(dtype))

    def layers(h, p, scales):
        def body(h, layer):
            h, x = residual_rms_norm(h, p, scales, layer, eps=1e-5)
            return h, x

        return jax.lax.scan(body, h, jnp.arange(3, dtype=jnp.int32))

    text = lower_for_gpu(layers, h, p, scales)
    assert triton_kernels(text) == 1

    def sandwich_layers(h, p, scales):
        def body(h, layer):
            return residual_rms_norm(
                h, p, scales, layer + 1, eps=1e-5, out_scales=scales, out_layer=layer
            )

        return jax.lax.scan(body, h, jnp.arange(3, dtype=jnp.int32))

    text = lower_for_gpu(sandwich_layers, h, p, scales)
    assert triton_kernels(text) == 1 and "residual_rms_norm_sandwich" in text


# --- the residual add and norm with the LoRA shrink of the group that reads x ----------------


def _shrink_problem(seed, tokens, width, out_widths, dtype, parts=4, rows_per_page=4, max_pages=3):
    """A problem of tests/test_sgmv.py (A pool NaN beyond every rank and on free pages, shuffled
    page ids, mixed ranks, tokens without adapter) with a residual stream of its width."""
    problem = make_problem(
        seed,
        num_tokens=tokens,
        in_width=width,
        out_widths=out_widths,
        rows_per_page=rows_per_page,
        max_pages=max_pages,
        num_layers=3,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed + 1)
    h, p, scales = _inputs(rng, tokens, width, parts, 3, dtype)
    tables = (problem.a_pool, problem.a_pages, problem.ranks, jnp.asarray(problem.token_slot))
    return h, p, scales, tables, problem


def _norm_shrink(h, p, scales, layer, tables, weights, **kw):
    return jax.jit(
        lambda h, p, scales, layer, *tables: residual_rms_norm_shrink(
            h, p, scales, layer, *tables, eps=1e-5, weights=weights, **kw
        )
    )(h, p, scales, layer, *tables)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "tokens, width, out_widths, rows",
    [
        (1, 64, (32, 16, 16), 8),  # q|k|v: 3 weights
        (7, 96, (56, 56), 4),  # gate|up, a width no power of two
        (13, 128, (40,), 16),  # one weight, fewer rank rows than a program's
        (32, 256, (32, 16, 16), 2),
    ],
)
def test_norm_shrink_matches_reference(tokens, width, out_widths, rows, dtype, interpret):
    dtype = jnp.dtype(dtype)
    h, p, scales, tables, problem = _shrink_problem(
        tokens + width, tokens, width, out_widths, dtype
    )
    layer = problem.layer
    got = _norm_shrink(h, p, scales, layer, tables, problem.weights, rows=rows, interpret=interpret)
    want = residual_rms_norm_shrink_reference(
        h, p, scales, layer, *tables, eps=1e-5, weights=problem.weights
    )
    for g, w, name in zip(got, want, ("h", "x", "v"), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
    tol = TOL[dtype.name]
    for g, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol
        )
    # Every v element written (the interpreter starts outputs as NaN; the pool holds NaN beyond
    # each rank, which no live row reads), tokens without adapter and rows past the rank 0.
    v = np.asarray(got[2])
    assert np.isfinite(v).all()
    slot = problem.token_slot
    assert (v[slot < 0] == 0).all()
    # The shrink of the kernel's own x: float32 dots of bf16 or f32 operands.
    of_its_x = sgmv_shrink_reference(got[1], *tables, layer, weights=problem.weights)
    np.testing.assert_allclose(v, np.asarray(of_its_x), rtol=1e-5, atol=1e-4)
    scale = np.abs(np.asarray(want[2])).max()
    np.testing.assert_allclose(v, np.asarray(want[2]), rtol=tol, atol=tol * scale)


def test_norm_shrink_clamps_the_layer_as_the_last_layer_calls_it():
    """The model's last layer normalizes for a next layer that does not exist (layer + 1 = L):
    the scale row and the A rows are both clamped to the last layer."""
    h, p, scales, tables, problem = _shrink_problem(5, 6, 64, (56, 56), jnp.float32)
    last = _norm_shrink(h, p, scales, jnp.int32(2), tables, problem.weights, interpret=True)
    past = _norm_shrink(h, p, scales, jnp.int32(3), tables, problem.weights, interpret=True)
    for a, b in zip(last, past, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    first = _norm_shrink(h, p, scales, jnp.int32(0), tables, problem.weights, interpret=True)
    assert not np.allclose(np.asarray(first[2]), np.asarray(last[2]))  # the A rows follow it


def test_norm_shrink_h_and_x_equal_the_plain_kernels():
    """h' and x are the same bits as residual_rms_norm's: one arithmetic for both kernels."""
    h, p, scales, tables, problem = _shrink_problem(9, 5, 96, (32, 16, 16), jnp.bfloat16)
    fused = _norm_shrink(h, p, scales, jnp.int32(1), tables, problem.weights, interpret=True)
    plain = residual_rms_norm(h, p, scales, jnp.int32(1), eps=1e-5, interpret=True)
    for a, b in zip(fused[:2], plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_norm_shrink_bad_inputs_name_the_field():
    h, p, scales, tables, problem = _shrink_problem(3, 4, 64, (40,), jnp.float32)
    a_pool, a_pages, ranks, slots = tables
    fn = functools.partial(residual_rms_norm_shrink, eps=1e-5, weights=problem.weights)
    with pytest.raises(ConfigError, match="residual_rms_norm_shrink: rows must be a power of two"):
        fn(h, p, scales, 0, *tables, rows=6)
    with pytest.raises(ConfigError, match=r"a_pool must be \(3, P, R, 64\)"):
        fn(h, p, scales, 0, a_pool[..., :32], a_pages, ranks, slots)
    with pytest.raises(ConfigError, match=r"a_pool must be \(3, P, R, 64\)"):
        fn(h, p, scales, 0, a_pool[:2], a_pages, ranks, slots)
    with pytest.raises(ConfigError, match=r"token_slot must be \(T,\) = \(4,\)"):
        fn(h, p, scales, 0, a_pool, a_pages, ranks, slots[:3])
    with pytest.raises(ConfigError, match="residual_rms_norm_shrink_reference: parts must be"):
        residual_rms_norm_shrink_reference(
            h, p[:, :2], scales, 0, *tables, eps=1e-5, weights=problem.weights
        )


def test_norm_shrink_lowers_for_the_gpu():
    """Lowered for an H100 at the model's shapes (4,096 wide, q|k|v of rank 16 in pages of 16,
    bf16), the layer the traced counter of a scan: one Triton kernel."""
    h, p, scales, tables, problem = _shrink_problem(
        4, 32, 4096, (4096, 4096, 4096), jnp.bfloat16, rows_per_page=16, max_pages=1
    )

    def layers(h, p, scales, *tables):
        def body(h, layer):
            h, x, v = residual_rms_norm_shrink(
                h, p, scales, layer, *tables, eps=1e-5, weights=problem.weights
            )
            return h, (x, v)

        return jax.lax.scan(body, h, jnp.arange(3, dtype=jnp.int32))

    text = lower_for_gpu(layers, h, p, scales, *tables)
    assert triton_kernels(text) == 1
    assert "residual_rms_norm_shrink_s4_d4096_rows8_w16" in text

"""pallas_kernels/swiglu.py: SwiGLU of gate|up with the LoRA shrink of down, in one launch,
against its reference (the model's SwiGLU, then the SGMV shrink reference)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.errors import ConfigError
from pallas_kernels.sgmv import sgmv_shrink_reference
from pallas_kernels.swiglu import row_pieces, swiglu, swiglu_shrink, swiglu_shrink_reference
from tests.gpu_lowering import lower_for_gpu, triton_kernels
from tests.test_sgmv import make_problem

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]

# One rounding step of the dtype: silu may round either way where the kernel's exp differs
# from XLA's.
TOL = {"float32": 1e-5, "bfloat16": 1.6e-2}


def test_row_pieces_tile_the_row_in_powers_of_two():
    assert row_pieces(11008, 4096) == (
        (0, 4096),
        (4096, 4096),
        (8192, 2048),
        (10240, 512),
        (10752, 256),
    )
    for block in (1, 16, 64):
        for width in range(1, 300):
            pieces = row_pieces(width, block)
            assert [o for o, _ in pieces] == list(np.cumsum([0] + [s for _, s in pieces[:-1]]))
            assert sum(s for _, s in pieces) == width
            assert all(s <= block and s & (s - 1) == 0 for _, s in pieces)


def _problem(seed, tokens, width, dtype, rows_per_page=4, max_pages=3):
    """A down-group problem of tests/test_sgmv.py (A pool NaN beyond every rank and on free
    pages, shuffled page ids, mixed ranks, tokens without adapter) and a gate|up row."""
    problem = make_problem(
        seed,
        num_tokens=tokens,
        in_width=width,
        out_widths=(24,),
        rows_per_page=rows_per_page,
        max_pages=max_pages,
        num_layers=3,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed + 1)
    gate_up = jnp.asarray(rng.normal(size=(tokens, 2 * width)) * 2, dtype)
    tables = (problem.a_pool, problem.a_pages, problem.ranks, jnp.asarray(problem.token_slot))
    return gate_up, tables, problem


def _kernel(gate_up, tables, layer, weights, **kw):
    return jax.jit(
        lambda gate_up, layer, *tables: swiglu_shrink(
            gate_up, *tables, layer, weights=weights, **kw
        )
    )(gate_up, layer, *tables)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "tokens, width, rows, block",
    [(1, 64, 8, 64), (7, 88, 4, 32), (13, 200, 16, 64), (32, 344, 2, 128)],
)
def test_kernel_matches_reference(tokens, width, rows, block, dtype, interpret):
    dtype = jnp.dtype(dtype)
    gate_up, tables, problem = _problem(tokens + width, tokens, width, dtype)
    got = _kernel(
        gate_up, tables, problem.layer, problem.weights, rows=rows, block=block, interpret=interpret
    )
    want = swiglu_shrink_reference(gate_up, *tables, problem.layer, weights=problem.weights)
    for g, w, name in zip(got, want, ("hidden", "v"), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
    tol = TOL[dtype.name]
    np.testing.assert_allclose(
        np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), rtol=tol, atol=tol
    )
    # Every v element written (the interpreter starts outputs as NaN; the pool holds NaN beyond
    # each rank, which no live row reads); tokens without adapter 0.
    v = np.asarray(got[1])
    assert np.isfinite(v).all()
    assert (v[problem.token_slot < 0] == 0).all()
    of_its_hidden = sgmv_shrink_reference(got[0], *tables, problem.layer, weights=problem.weights)
    np.testing.assert_allclose(v, np.asarray(of_its_hidden), rtol=1e-5, atol=1e-4)
    scale = np.abs(np.asarray(want[1])).max()
    np.testing.assert_allclose(v, np.asarray(want[1]), rtol=tol, atol=tol * scale)


def test_reference_hidden_is_the_models_swiglu():
    """The reference's hidden is jaxlora.model.MLP's arithmetic (pallas_kernels.swiglu.silu_mul):
    float32 silu(gate) * up, rounded once."""
    gate_up, tables, problem = _problem(3, 5, 40, jnp.bfloat16)
    gate, up = gate_up[:, :40], gate_up[:, 40:]
    model = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(jnp.bfloat16)
    hidden, _ = swiglu_shrink_reference(gate_up, *tables, 0, weights=problem.weights)
    np.testing.assert_array_equal(np.asarray(hidden, np.float32), np.asarray(model, np.float32))
    np.testing.assert_array_equal(np.asarray(swiglu(gate_up)), np.asarray(hidden))


def test_layer_is_traced_and_clamped():
    gate_up, tables, problem = _problem(4, 6, 64, jnp.float32)
    fn = functools.partial(_kernel, gate_up, tables, weights=problem.weights, interpret=True)
    last, past, first = (fn(jnp.int32(i))[1] for i in (2, 3, 0))
    np.testing.assert_array_equal(np.asarray(last), np.asarray(past))
    assert not np.allclose(np.asarray(first), np.asarray(last))  # the A rows follow the layer


def test_bad_inputs_name_the_field():
    gate_up, tables, problem = _problem(5, 4, 64, jnp.float32)
    a_pool, a_pages, ranks, slots = tables
    fn = functools.partial(swiglu_shrink, weights=problem.weights)
    with pytest.raises(ConfigError, match="swiglu.py swiglu_shrink: rows must be a power of two"):
        fn(gate_up, *tables, 0, rows=3)
    with pytest.raises(ConfigError, match="block must be a power of two"):
        fn(gate_up, *tables, 0, block=48)
    with pytest.raises(ConfigError, match=r"gate_up must be \(T, 2 I\)"):
        fn(gate_up[:, :63], *tables, 0)
    with pytest.raises(ConfigError, match=r"a_pool must be \(L, P, R, 64\)"):
        fn(gate_up, a_pool[..., :32], a_pages, ranks, slots, 0)
    with pytest.raises(ConfigError, match="swiglu_shrink_reference: token_slot must be"):
        swiglu_shrink_reference(gate_up, a_pool, a_pages, ranks, slots[:2], 0, weights=(6,))


def test_kernel_lowers_for_the_gpu():
    """Lowered for an H100 at the model's shapes (intermediate 11,008, rank 16 in pages of 16,
    bf16), the layer the traced counter of a scan: one Triton kernel."""
    gate_up, tables, problem = _problem(6, 32, 11008, jnp.bfloat16, rows_per_page=16, max_pages=1)

    def layers(gate_up, *tables):
        def body(carry, layer):
            hidden, v = swiglu_shrink(gate_up, *tables, layer, weights=problem.weights)
            return carry, (hidden, v)

        return jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))

    text = lower_for_gpu(layers, gate_up, *tables)
    assert triton_kernels(text) == 1
    assert "swiglu_shrink_i11008_rows8_b4096_w16" in text


def test_gated_activations_are_transformers_formulas():
    """gated_activation's GELUs (ModelConfig.activation, from config.json's hidden_act): Gemma's
    gelu_pytorch_tanh is 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), gelu the erf form;
    the two differ (by up to ~5e-4 here), and an unknown name is refused."""
    import math

    from jaxlora.errors import ConfigError
    from pallas_kernels.swiglu import gated_activation

    x = np.linspace(-6.0, 6.0, 2001, dtype=np.float64)
    up = np.full_like(x, 1.5)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf_form = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    silu_form = x / (1 + np.exp(-x))

    def run(activation):
        out = gated_activation(
            jnp.asarray(x, jnp.float32), jnp.asarray(up, jnp.float32), jnp.float32, activation
        )
        return np.asarray(out, np.float64)

    for activation, expected in (
        ("gelu_tanh", tanh_form),
        ("gelu", erf_form),
        ("silu", silu_form),
    ):
        np.testing.assert_allclose(run(activation), 1.5 * expected, rtol=2e-6, atol=2e-6)
    assert np.abs(run("gelu_tanh") - run("gelu")).max() > 1e-4
    with pytest.raises(ConfigError, match="activation 'relu': expected one of"):
        gated_activation(jnp.ones(2), jnp.ones(2), jnp.float32, "relu")

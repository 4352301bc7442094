"""pallas_kernels/residual_norm.py: the residual add after a split-K projection and the RMSNorm
after it, in one launch, against its reference and against the model's own modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.errors import ConfigError
from jaxlora.model import RMSNorm
from pallas_kernels.residual_norm import residual_rms_norm, residual_rms_norm_reference
from tests.gpu_lowering import lower_for_gpu, triton_kernels

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

"""The Flax Llama and its LoRA hook (reference path), independent of any file format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.lora import LoraWeights, pack_adapters, random_lora_weights
from jaxlora.model import Llama, init_params
from pallas_kernels.layout import MODULES, NO_ADAPTER


def random_lora(config, name, rank, modules, seed, scale=0.5):
    return random_lora_weights(config, name, rank, modules, seed=seed, scale=scale)


def merged_params(params, lora: LoraWeights):
    """Base parameters with W += scale * A @ B folded in: what an adapter must compute."""
    merged = jax.tree.map(np.array, params)
    groups = {
        "q_proj": "attn",
        "k_proj": "attn",
        "v_proj": "attn",
        "o_proj": "attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    for m in lora.a:
        delta = np.einsum("lri,lro->lio", lora.a[m], lora.b[m]) * lora.scales[m]
        merged["layers"][groups[m]][m]["kernel"] += delta
    return merged


@pytest.fixture(scope="module")
def tiny():
    return TINY, init_params(TINY, 0)


def test_param_tree_has_logical_layout(tiny):
    config, params = tiny
    layers = params["layers"]
    assert layers["attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    assert layers["attn"]["k_proj"]["kernel"].shape == (2, 64, 32)
    assert layers["mlp"]["down_proj"]["kernel"].shape == (2, 128, 64)
    assert params["lm_head"]["kernel"].shape == (64, 512)


def test_no_adapter_tokens_get_exactly_the_base_model(tiny):
    config, params = tiny
    model = Llama(config)
    tokens = jnp.array(np.random.default_rng(0).integers(0, 512, (3, 7)), jnp.int32)
    base = model.apply({"params": params}, tokens)
    lora = pack_adapters(config, [random_lora(config, "a", 4, MODULES, 1)])
    out = model.apply(
        {"params": params}, tokens, lora=lora.with_tokens(jnp.full((3, 7), NO_ADAPTER, jnp.int32))
    )
    np.testing.assert_array_equal(np.asarray(base), np.asarray(out))


def test_mixed_batch_matches_merged_weights_per_row(tiny):
    config, params = tiny
    model = Llama(config)
    adapters = [
        random_lora(config, "all", 5, MODULES, 1),
        random_lora(config, "qv", 1, ("q_proj", "v_proj"), 2, scale=2.0),
        random_lora(config, "mlp", 19, ("gate_proj", "up_proj", "down_proj"), 3),
    ]
    tokens = jnp.array(np.random.default_rng(1).integers(0, 512, (4, 6)), jnp.int32)
    row_slot = np.array([2, NO_ADAPTER, 0, 1], np.int32)
    lora = pack_adapters(
        config,
        adapters,
        LoraPoolConfig(max_rank=32, rows_per_page=8, pages_per_pool=64, max_slots=4),
    )
    lora = lora.with_tokens(jnp.asarray(np.repeat(row_slot[:, None], 6, axis=1)))
    mixed = np.asarray(model.apply({"params": params}, tokens, lora=lora))
    for row, slot in enumerate(row_slot):
        p = params if slot == NO_ADAPTER else merged_params(params, adapters[slot])
        expected = np.asarray(model.apply({"params": p}, tokens[row : row + 1]))[0]
        err = np.abs(mixed[row] - expected).max() / np.abs(expected).max()
        assert err < 1e-5, (row, slot, err)
    # the adapters really change the output, so the comparison above can fail
    base = np.asarray(model.apply({"params": params}, tokens))
    for row, slot in enumerate(row_slot):
        if slot != NO_ADAPTER:
            assert np.abs(mixed[row] - base[row]).max() > 1e-3


def test_padding_mask_leaves_real_tokens_unchanged(tiny):
    config, params = tiny
    model = Llama(config)
    tokens = jnp.array(np.random.default_rng(2).integers(0, 512, (1, 5)), jnp.int32)
    padded = jnp.concatenate([tokens, jnp.zeros((1, 3), jnp.int32)], axis=1)
    mask = jnp.array([[True] * 5 + [False] * 3])
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, padded, attn_mask=mask)[:, :5]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

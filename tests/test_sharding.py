"""Tensor parallelism on 4 fake CPU devices: same function, weights really split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.errors import ConfigError
from jaxlora.lora import pack_adapters
from jaxlora.model import Llama, init_params
from jaxlora.sharding import TP_AXIS, make_mesh, pool_shardings, replicated, shard_params
from pallas_kernels.layout import MODULES, NO_ADAPTER
from tests.test_model import random_lora

TP_CONFIG = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, head_dim=8)


def test_sharded_forward_equals_single_device_and_weights_are_split():
    assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
    config = TP_CONFIG
    params = init_params(config, 3)
    adapters = [random_lora(config, "a", 6, MODULES, 1), random_lora(config, "b", 2, MODULES, 2)]
    lora = pack_adapters(
        config,
        adapters,
        LoraPoolConfig(max_rank=16, rows_per_page=4, pages_per_pool=32, max_slots=2),
    )
    tokens = jnp.array(np.random.default_rng(0).integers(0, 512, (3, 5)), jnp.int32)
    slots = jnp.asarray(np.repeat(np.array([[1], [NO_ADAPTER], [0]], np.int32), 5, axis=1))
    lora = lora.with_tokens(slots)
    model = Llama(config)
    expected = np.asarray(model.apply({"params": params}, tokens, lora=lora))

    mesh = make_mesh(4)
    sharded = shard_params(params, config, mesh)
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    o = sharded["layers"]["attn"]["o_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, TP_AXIS)
    assert o.sharding.spec == jax.sharding.PartitionSpec(None, TP_AXIS, None)
    assert q.addressable_shards[0].data.shape == (2, 64, 16)
    assert sharded["lm_head"]["kernel"].addressable_shards[0].data.shape == (64, 128)
    pools = jax.device_put(lora.pools, pool_shardings(mesh))
    assert pools["mlp"].addressable_shards[0].data.shape[-1] == config.intermediate_size // 4
    assert pools["embed"].addressable_shards[0].data.shape[-1] == config.hidden_size
    lora_sharded = jax.device_put(lora.replace(pools={}), replicated(mesh)).replace(pools=pools)

    forward = jax.jit(lambda p, t, l: model.apply({"params": p}, t, lora=l))
    got = np.asarray(forward(sharded, tokens, lora_sharded))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_projections_shard_one_group_per_device():
    from jaxlora.model import fuse_projections

    config = TP_CONFIG
    params = init_params(config, 3)
    tokens = jnp.array(np.random.default_rng(1).integers(0, 512, (2, 4)), jnp.int32)
    model = Llama(config)
    expected = np.asarray(model.apply({"params": params}, tokens))
    mesh = make_mesh(4)
    sharded = shard_params(fuse_projections(params, groups=4), config, mesh)
    qkv = sharded["layers"]["attn"]["qkv_proj"]["kernel"]
    gate_up = sharded["layers"]["mlp"]["gate_up_proj"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, TP_AXIS, None)
    assert qkv.addressable_shards[0].data.shape == (2, 64, 1, (64 + 2 * 32) // 4)
    assert gate_up.addressable_shards[0].data.shape == (2, 64, 1, 2 * 128 // 4)
    got = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"fused for 2 tensor-parallel groups; expected groups=4"):
        shard_params(fuse_projections(params, groups=2), config, mesh)


def test_indivisible_tp_is_a_clear_error():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        shard_params(
            init_params(TINY, 0),
            dataclasses.replace(TINY, num_kv_heads=2, num_heads=4),
            make_mesh(4),
        )


def test_tensor_parallel_engine_generates_the_single_device_tokens(monkeypatch):
    """Over 4 devices (prefill page tables cut to an 8-key context bucket there, whole on one
    device; prefill attention over a longer table block by block, 8 keys a block, there, in
    one pass over the whole table on one device) the engine generates the single device's
    tokens."""
    import dataclasses

    from jaxlora import model as model_module
    from jaxlora.llm import LLM
    from jaxlora.sampling import SamplingParams
    from tests.test_engine import record_table_widths, small_engine_config

    config = TP_CONFIG
    params = init_params(config, 5)
    adapters = {
        "a": random_lora(config, "a", 4, MODULES, 1),
        "b": random_lora(config, "b", 2, ("q_proj", "down_proj"), 2),
    }
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3], [40, 41, 42]]
    names = ["a", None, "b"]
    sampling = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    blocked_tables = []
    blocked_attention = model_module._blocked_cached_attention

    def record_blocked(q, positions, layer, kv, *args, **kwargs):
        blocked_tables.append(kv.page_table.shape[1])
        return blocked_attention(q, positions, layer, kv, *args, **kwargs)

    monkeypatch.setattr(model_module, "_blocked_cached_attention", record_blocked)
    outs = {}
    for tp in (1, 4):
        engine_config = small_engine_config()
        runner = dataclasses.replace(
            engine_config.runner,
            prefill_context_buckets=(8,) if tp > 1 else (),
            prefill_key_block=8 if tp > 1 else None,
        )
        llm = LLM(
            config,
            params=params,
            adapters=adapters,
            engine_config=dataclasses.replace(engine_config, runner=runner),
            load_workers=0,
            tp=tp,
        )
        widths = record_table_widths(llm)
        outs[tp] = [o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sampling)]
        assert ("prefill", 2) in widths if tp == 4 else ("prefill", 2) not in widths
        # The 11-token prompt's second chunk reads the whole 16-page table (past the bucket),
        # block by block on 4 devices; the 2-page tables fit in one block.
        assert set(blocked_tables) == ({16} if tp == 4 else set()), blocked_tables
        if tp == 4:
            assert llm.engine.kv.k_pool.addressable_shards[0].data.shape[3] == 1
            # the engine runs fused projections, one group of q|k|v columns per device
            qkv = llm.params["layers"]["attn"]["qkv_proj"]["kernel"]
            assert qkv.shape[-2] == 4
            assert qkv.addressable_shards[0].data.shape[-2:] == (
                1,
                (config.q_size + 2 * config.kv_size) // 4,
            )
    assert outs[4] == outs[1]

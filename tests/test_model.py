"""The Flax Llama and its LoRA hook (reference path), independent of any file format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.errors import ConfigError
from jaxlora.lora import LoraWeights, pack_adapters, random_lora_weights
from jaxlora.model import (
    KVCache,
    Llama,
    apply_rope,
    fuse_projections,
    init_params,
    projections_fused,
    rope_inverse_frequencies,
    rope_tables,
    unfuse_projections,
)
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


@pytest.mark.parametrize(
    "impl, axis_pages",
    [
        ("reference", ()),
        # Pools of four page counts (LoraPoolConfig.axis_pages): the SGMV kernels find each
        # pool's pages from its own array.
        ("pallas_interpret", (("heads", 7), ("kv_heads", 5), ("mlp", 13))),
    ],
    ids=["reference", "pallas_pools_apart"],
)
def test_mixed_batch_matches_merged_weights_per_row(tiny, impl, axis_pages):
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
        LoraPoolConfig(
            max_rank=32, rows_per_page=8, pages_per_pool=64, max_slots=4, axis_pages=axis_pages
        ),
        impl=impl,
    )
    assert [p.shape[1] for p in lora.pools.values()] == [64, *dict(axis_pages).values()] or (
        not axis_pages
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


def _primitives(jaxpr, inside_scan=False):
    """(primitive name, whether inside a scan body) of every equation, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out.append((eqn.primitive.name, inside_scan))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _primitives(inner, inside_scan or eqn.primitive.name == "scan")
    return out


@pytest.mark.parametrize("scan_layers", [True, False])
def test_rope_tables_are_computed_once_outside_the_layer_loop(tiny, scan_layers):
    """The rotary cos / sin tables depend only on the positions: one cos and one sin per step,
    none inside the layer scan (XLA would run them once per layer). Rotating with the tables
    is rotating with the positions (tests/test_golden.py checks the model against HF's)."""
    config, params = tiny
    tokens = jnp.array(np.random.default_rng(3).integers(0, 512, (2, 6)), jnp.int32)
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]], jnp.int32)
    model = Llama(config, scan_layers=scan_layers)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, positions))(params)
    prims = _primitives(jaxpr.jaxpr)
    assert [inside for name, inside in prims if name in ("cos", "sin")] == [False, False]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, config.head_dim))
    inv_freq = rope_inverse_frequencies(config)
    tables = rope_tables(positions, inv_freq)
    np.testing.assert_array_equal(
        np.asarray(apply_rope(x, positions, inv_freq, tables)),
        np.asarray(apply_rope(x, positions, inv_freq)),
    )
    assert not np.allclose(np.asarray(apply_rope(x, positions, inv_freq)), np.asarray(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_projections_compute_the_same_model(tiny, groups):
    config, params = tiny
    fused = fuse_projections(params, groups=groups)
    assert projections_fused(fused) and not projections_fused(params)
    attn, mlp = fused["layers"]["attn"], fused["layers"]["mlp"]
    assert set(attn) == {"qkv_proj", "o_proj"} and set(mlp) == {"gate_up_proj", "down_proj"}
    assert attn["qkv_proj"]["kernel"].shape == (2, 64, groups, (64 + 2 * 32) // groups)
    assert mlp["gate_up_proj"]["kernel"].shape == (2, 64, groups, 2 * 128 // groups)
    # group g holds the q, k, v columns of shard g, in that order
    q = np.asarray(params["layers"]["attn"]["q_proj"]["kernel"])
    k = np.asarray(params["layers"]["attn"]["k_proj"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(attn["qkv_proj"]["kernel"][:, :, groups - 1, : 64 // groups]),
        q[:, :, 64 - 64 // groups :],
    )
    np.testing.assert_array_equal(
        np.asarray(attn["qkv_proj"]["kernel"][:, :, 0, 64 // groups : (64 + 32) // groups]),
        k[:, :, : 32 // groups],
    )
    model = Llama(config)
    tokens = jnp.array(np.random.default_rng(3).integers(0, 512, (3, 5)), jnp.int32)
    lora = pack_adapters(
        config, [random_lora(config, "a", 4, MODULES, 1), random_lora(config, "b", 2, MODULES, 2)]
    ).with_tokens(jnp.array([[0] * 5, [NO_ADAPTER] * 5, [1, 1, 0, 0, NO_ADAPTER]], jnp.int32))
    for scan_layers in (True, False):
        model = Llama(config, scan_layers=scan_layers)
        for kwargs in ({}, {"lora": lora}):
            expected = np.asarray(model.apply({"params": params}, tokens, **kwargs))
            got = np.asarray(model.apply({"params": fused}, tokens, **kwargs))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    base = np.asarray(model.apply({"params": fused}, tokens))
    assert np.abs(np.asarray(model.apply({"params": fused}, tokens, lora=lora)) - base).max() > 1e-3


def test_fuse_projections_round_trips_and_checks_groups(tiny):
    config, params = tiny
    fused = fuse_projections(params, groups=2)
    assert fuse_projections(fused) is fused
    back = unfuse_projections(fused)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert unfuse_projections(params) is params
    # flax FrozenDict trees are recognised too; malformed trees are simply "not fused"
    from flax.core import FrozenDict

    assert projections_fused(FrozenDict(fused)) and not projections_fused(FrozenDict(params))
    assert not projections_fused({"layers": []}) and not projections_fused(None)
    with pytest.raises(ConfigError, match=r"attn.q_proj has 64 output columns.*groups=3"):
        fuse_projections(params, groups=3)


def test_projection_kernels_need_the_one_group_fused_form(tiny):
    """lora_matmul serves the fused one-group tree (q|k|v and gate|up each one (L, K, N) kernel,
    a free reshape); the canonical tree and fused trees for tensor parallelism keep XLA's GEMMs."""
    from jaxlora.errors import ConfigError
    from jaxlora.model import projection_kernels

    config, params = tiny
    assert projection_kernels(params) is None
    assert projection_kernels(fuse_projections(params, groups=2)) is None
    kernels = projection_kernels(fuse_projections(params), impl="pallas_interpret")
    shapes = {g: k.shape for g, k in kernels.kernels.items()}
    assert shapes == {
        "qkv": (2, 64, 128),
        "o": (2, 64, 64),
        "gate_up": (2, 64, 256),
        "down": (2, 128, 64),
    }
    assert kernels.applies("qkv", 8, (64, 32, 32)) and not kernels.applies("qkv", 129, (64,))
    # 33..64 tokens only where the shrink runs in lora_matmul's K loop (few adapters).
    assert not kernels.applies("qkv", 64, (64, 32, 32))
    assert kernels.applies("qkv", 64, (64, 32, 32), k_loop_shrink=True)
    assert not kernels.applies("qkv", 65, (64, 32, 32), k_loop_shrink=True)
    with pytest.raises(ConfigError, match="projection_kernel"):
        projection_kernels(fuse_projections(params), impl="triton")


def test_the_scan_unrolls_two_layers_only_where_lora_matmul_runs_every_projection(tiny):
    """scan_unroll_for_step: 2 layers a scan iteration where every projection group runs
    lora_matmul (no GEMM of XLA's reads a slice of the stacked weights, which XLA would copy in
    blocks of two layers), 1 where any of XLA's GEMMs runs: no kernels (prefill, the "xla"
    choice), more tokens than lora_matmul takes (MatmulConfig.plain_max_tokens; max_tokens
    where the step's shrink runs in its K loop), or a group it does not run."""
    from jaxlora.lora import LoraInputs
    from jaxlora.model import projection_kernels, scan_unroll_for_step
    from pallas_kernels.lora_matmul import MatmulConfig

    config, params = tiny
    fused = fuse_projections(params)
    kernels = projection_kernels(fused, impl="pallas_interpret")
    plain, limit = MatmulConfig().plain_max_tokens, MatmulConfig().max_tokens
    assert plain < limit
    few = LoraInputs(
        pools={},
        a_pages=None,
        b_pages=None,
        ranks=None,
        scales=None,
        token_slot=None,
        shrink_rows=np.zeros((2, 32), np.int32),
    )
    many = few.replace(shrink_rows=None)
    for lora in (None, many):
        assert scan_unroll_for_step(config, kernels, 1, lora) == 2
        assert scan_unroll_for_step(config, kernels, plain, lora) == 2
        assert scan_unroll_for_step(config, kernels, plain + 1, lora) == 1
    assert scan_unroll_for_step(config, kernels, limit, few) == 2
    assert scan_unroll_for_step(config, kernels, limit + 1, few) == 1
    assert scan_unroll_for_step(config, None, 1) == 1
    # One group left to XLA's GEMM (here: down missing) is enough for one layer an iteration.
    three = kernels.replace(kernels={g: k for g, k in kernels.kernels.items() if g != "down"})
    assert scan_unroll_for_step(config, three, 1) == 1


def prefill_kv(k_pool, v_pool, table, lengths, counts, chunk, **fields):
    """A prefill chunk's KVCache: rows of ``counts`` new tokens ending at ``lengths`` over their
    ``table`` pages (the chunk padded to ``chunk``); other KVCache fields as given."""
    return KVCache(
        k_pool=k_pool,
        v_pool=v_pool,
        page_table=jnp.asarray(table, jnp.int32),
        seq_lens=jnp.asarray(lengths, jnp.int32),
        token_valid=jnp.asarray(np.arange(chunk)[None, :] < np.asarray(counts)[:, None]),
        mode="prefill",
        **fields,
    )


@pytest.mark.parametrize(
    ("impl", "block", "window", "softcap"),
    [
        ("reference", None, None, None),
        ("reference", None, 6, None),
        ("pallas_interpret", None, None, None),
        ("pallas_interpret", None, None, 30.0),
        ("pallas_interpret", 8, None, None),
        ("pallas_interpret", 8, 6, None),
    ],
)
def test_prefill_attention_is_blind_to_what_a_row_does_not_read(impl, block, window, softcap):
    """Slots of a row's pages past its length, or before its window, hold whatever the pages'
    last holder left there, NaN and inf included (a request whose activations overflowed, an
    adapter with absurd weights: its pages go back to the pool and come to another request).
    A prefill chunk's attention (the reference path, XLA's dot_product_attention, the soft-
    capped one, blocks of keys; causal and windowed) gives the same output, all finite, as
    over zeros there."""
    import dataclasses

    from jaxlora.model import _cached_attention

    rng = np.random.default_rng(5)
    layers, pages, page_size, kvh, group, d, chunk = 2, 24, 4, 2, 2, 16, 8
    table = rng.permutation(pages).reshape(4, 6)  # (each row its own pages)
    starts, counts = np.asarray([0, 9, 14, 0]), np.asarray([8, 5, 8, 0])
    lengths = starts + counts
    clean = rng.standard_normal((2, layers, pages, page_size, kvh, d)).astype(np.float32)
    junk = np.full_like(clean, np.nan)
    junk[1, :, :, 1::2] = np.inf  # (some inf among the NaN)
    read = np.zeros((pages, page_size), bool)  # the slots some token of its row reads
    for row in range(4):
        first = 0 if window is None else max(0, starts[row] - window + 1)
        for pos in range(first, lengths[row]):
            read[table[row, pos // page_size], pos % page_size] = True
    poisoned = np.where(read[None, None, :, :, None, None], clean, junk)
    zeroed = np.where(read[None, None, :, :, None, None], clean, 0.0)
    positions = jnp.asarray(starts[:, None] + np.arange(chunk), jnp.int32)
    q = jnp.asarray(rng.standard_normal((4, chunk, kvh * group, d)), jnp.float32)
    config = dataclasses.replace(
        TINY, model_type="mistral", sliding_window=window, attn_logit_softcapping=softcap
    )
    outs = []
    for pools in (zeroed, poisoned):
        k_pool, v_pool = jnp.asarray(pools[0]), jnp.asarray(pools[1])
        kv = prefill_kv(
            k_pool, v_pool, table, lengths, counts, chunk, impl=impl, prefill_key_block=block
        )
        outs.append(np.asarray(_cached_attention(q, positions, 1, kv, k_pool, v_pool, config)))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_array_equal(outs[1], outs[0])


def test_cudnn_prefill_attention_falls_back_to_xla_s_where_it_cannot_run(monkeypatch):
    """KVCache.prefill_attention="cudnn" (and "auto") runs XLA's attention where cuDNN's cannot
    (this CPU; float32 activations anywhere; shapes jax's cuDNN check refuses while tracing):
    the same output, bit for bit."""
    import jaxlora.model as model_module
    from jaxlora.model import _cached_attention, _prefill_attention_implementation

    rng = np.random.default_rng(3)
    pools = jnp.asarray(rng.standard_normal((2, 1, 8, 4, 2, 16)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 4, 16)), jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8]], jnp.int32)
    outs = []
    for implementation in ("xla", "cudnn", "auto"):
        table = [[0, 1, 2, 3], [4, 5, 6, 7]]
        kv = prefill_kv(
            pools[0],
            pools[1],
            table,
            [4, 9],
            [4, 4],
            4,
            impl="pallas_interpret",
            prefill_attention=implementation,
        )
        assert _prefill_attention_implementation(kv, q) == "xla"
        outs.append(np.asarray(_cached_attention(q, positions, 0, kv, pools[0], pools[1], TINY)))
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    # Where cuDNN is chosen but jax's check refuses the shapes (NotImplementedError).
    xla_attention, asked = jax.nn.dot_product_attention, []

    def refusing(*args, implementation=None, **kwargs):
        asked.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("The head dim must be <= 256 and a multiple of 8")
        return xla_attention(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    monkeypatch.setattr(model_module, "_prefill_attention_implementation", lambda kv, q: "cudnn")
    refused = _cached_attention(q, positions, 0, kv, pools[0], pools[1], TINY)
    assert asked == ["cudnn", "xla"]
    np.testing.assert_array_equal(np.asarray(refused), outs[0])


def test_auto_prefill_attention_takes_cudnn_on_a_gpu_for_heads_up_to_128(monkeypatch):
    """KVCache.prefill_attention="auto" (RunnerConfig's default): cuDNN's on a GPU for bf16 /
    fp16 heads of at most 128 (faster there on an H100), XLA's for Gemma's 256 (slower there),
    for float32 and off the GPU; "cudnn" takes cuDNN's for 256 too; "xla" never."""
    from jaxlora.model import _prefill_attention_implementation

    def chosen(setting, head_dim, dtype, backend="gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        kv = prefill_kv(None, None, [[0]], [1], [1], 1, prefill_attention=setting)
        return _prefill_attention_implementation(kv, jnp.zeros((1, 2, 4, head_dim), dtype))

    assert chosen("auto", 128, jnp.bfloat16) == "cudnn"
    assert chosen("auto", 64, jnp.float16) == "cudnn"
    assert chosen("auto", 256, jnp.bfloat16) == "xla"
    assert chosen("auto", 128, jnp.float32) == "xla"
    assert chosen("auto", 128, jnp.bfloat16, backend="cpu") == "xla"
    assert chosen("cudnn", 256, jnp.bfloat16) == "cudnn"
    assert chosen("xla", 128, jnp.bfloat16) == "xla"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "window, key_block", [(None, None), (40, None), (None, 64)], ids=["causal", "window40", "long"]
)
def test_cudnn_prefill_attention_is_xla_s(window, key_block):
    """RunnerConfig.prefill_attention="cudnn": a bf16 prefill chunk's one-pass attention runs in
    cuDNN's fused attention (its custom call is in the compiled step) and gives XLA's output
    within bf16 rounding: rows starting at 0 and mid-table, a ragged chunk, a padding row, GQA,
    head_dim 128, NaN in every slot no token reads; causal and with a sliding window. "long": a
    table past prefill_key_block, which XLA's attention reads block by block and cuDNN's in one
    pass."""
    import dataclasses

    from jaxlora.model import _cached_attention

    assert jax.default_backend() == "gpu"  # (the gpu marker skips it elsewhere)
    rng = np.random.default_rng(7)
    rows, pages_per_row, page_size, kvh, group, d, chunk = 4, 16, 16, 2, 4, 128, 64
    pages = rows * pages_per_row
    table = rng.permutation(pages).reshape(rows, pages_per_row)
    starts, counts = np.asarray([0, 100, 37, 0]), np.asarray([64, 64, 21, 0])
    lengths = starts + counts
    pools = rng.standard_normal((2, 1, pages, page_size, kvh, d)).astype(np.float32)
    read = np.zeros((pages, page_size), bool)
    for row in range(rows):
        for pos in range(lengths[row]):
            read[table[row, pos // page_size], pos % page_size] = True
    pools = np.where(read[None, None, :, :, None, None], pools, np.nan)
    k_pool, v_pool = (jnp.asarray(p, jnp.bfloat16) for p in pools)
    q = jnp.asarray(rng.standard_normal((rows, chunk, kvh * group, d)), jnp.bfloat16)
    positions = jnp.asarray(starts[:, None] + np.arange(chunk), jnp.int32)
    config = dataclasses.replace(
        TINY, model_type="mistral", sliding_window=window, head_dim=d, max_position_embeddings=512
    )
    outs = {}
    for implementation in ("xla", "cudnn"):
        kv = prefill_kv(
            k_pool,
            v_pool,
            table,
            lengths,
            counts,
            chunk,
            impl="pallas",
            prefill_attention=implementation,
            prefill_key_block=key_block,
        )
        step = jax.jit(lambda q, kv: _cached_attention(q, positions, 0, kv, k_pool, v_pool, config))
        compiled = step.lower(q, kv).compile().as_text()
        assert ("__cudnn$fmha" in compiled) == (implementation == "cudnn")
        # (the blocked path is a while loop over key blocks)
        assert ("while" in compiled) == (key_block is not None and implementation == "xla")
        outs[implementation] = np.asarray(step(q, kv), np.float32)
    assert np.isfinite(outs["cudnn"]).all()
    np.testing.assert_allclose(outs["cudnn"], outs["xla"], atol=2e-2, rtol=2e-2)


def test_cudnn_reads_a_table_past_the_key_block_in_one_pass(monkeypatch):
    """A prefill table past prefill_key_block: where cuDNN's attention runs (stood in for by
    XLA's here) it takes the whole table in one pass, no key blocks; where jax's check refuses
    its shapes, or the model soft-caps its logits, the blocked path runs instead of XLA's one
    pass over the long table. All three give the blocked path's output."""
    import dataclasses

    import jaxlora.model as model_module
    from jaxlora.model import _cached_attention

    rng = np.random.default_rng(11)
    pages, page_size, kvh, d, chunk = 16, 4, 2, 16, 8
    k_pool, v_pool = (
        jnp.asarray(rng.standard_normal((1, pages, page_size, kvh, d)), jnp.float32)
        for _ in range(2)
    )
    table = rng.permutation(pages).reshape(2, 8)
    starts, counts = np.asarray([0, 21]), np.asarray([8, 5])
    positions = jnp.asarray(starts[:, None] + np.arange(chunk), jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, chunk, 2 * kvh, d)), jnp.float32)

    def attention(config=TINY, **fields):
        kv = prefill_kv(
            k_pool, v_pool, table, starts + counts, counts, chunk, impl="pallas_interpret", **fields
        )
        return np.asarray(_cached_attention(q, positions, 0, kv, k_pool, v_pool, config))

    blocked = attention(prefill_key_block=8)  # (32 keys: 4 blocks of 8)
    xla_attention, asked, blocks = jax.nn.dot_product_attention, [], []
    refuse = [False]

    def cudnn_as_xla(query, key, *args, implementation=None, **kwargs):
        asked.append((implementation, key.shape[1]))
        if implementation == "cudnn" and refuse[0]:
            raise NotImplementedError("The head dim must be <= 256 and a multiple of 8")
        return xla_attention(query, key, *args, implementation="xla", **kwargs)

    fori_loop = jax.lax.fori_loop

    def counting(lower, upper, body, carry):
        blocks.append((int(lower), int(upper)))
        return fori_loop(lower, upper, body, carry)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_as_xla)
    monkeypatch.setattr(jax.lax, "fori_loop", counting)
    monkeypatch.setattr(model_module, "_prefill_attention_implementation", lambda kv, q: "cudnn")
    one_pass = attention(prefill_key_block=8)
    assert asked == [("cudnn", 32)] and blocks == []
    np.testing.assert_allclose(one_pass, blocked, atol=1e-5, rtol=0)
    asked.clear()
    refuse[0] = True
    refused = attention(prefill_key_block=8)
    assert asked == [("cudnn", 32)] and blocks == [(0, 4)]  # no XLA one pass over 32 keys
    np.testing.assert_array_equal(refused, blocked)
    capped = dataclasses.replace(TINY, attn_logit_softcapping=30.0)
    asked.clear(), blocks.clear()
    attention(capped, prefill_key_block=8)
    assert asked == [] and blocks == [(0, 4)]


@pytest.mark.parametrize("impl", ["pallas_interpret", "reference"])
@pytest.mark.parametrize("window", [None, 60, 20], ids=["causal", "window60", "window20"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blocked_prefill_attention_is_the_one_pass_attention(window, dtype, impl):
    """RunnerConfig.prefill_key_block: a prefill chunk's attention over a long page table,
    block by block (online softmax, as far as the longest row), gives the one-pass attention
    over the whole table: rows starting at 0 and mid-table, a ragged chunk, a padding row;
    causal and with a sliding window whose span is the table's (so the windowed gather does
    not take it) or half of it (8 pages: the windowed gather's keys past the block block too).
    The blocks visited follow the rows' lengths, not the table. The jnp path
    ("reference": the CPU's and the tensor-parallel steps') blocks as the kernels' does; its
    one pass is the dense attention."""
    import dataclasses

    from jaxlora.model import KVCache, _cached_attention

    rng = np.random.default_rng(3)
    layers, pages, page_size, kvh, group, d, chunk = 2, 40, 4, 2, 2, 16, 8
    k_pool, v_pool = (
        jnp.asarray(rng.standard_normal((layers, pages, page_size, kvh, d)), dtype)
        for _ in range(2)
    )
    table = jnp.asarray(rng.permutation(pages)[:32].reshape(2, 16).repeat(2, axis=0), jnp.int32)
    starts, counts = np.asarray([0, 20, 28, 0]), np.asarray([8, 5, 8, 0])
    positions = jnp.asarray(starts[:, None] + np.arange(chunk), jnp.int32)
    valid = jnp.asarray(np.arange(chunk)[None, :] < counts[:, None])
    q = jnp.asarray(rng.standard_normal((4, chunk, kvh * group, d)), dtype)
    kv = KVCache(
        k_pool=k_pool,
        v_pool=v_pool,
        page_table=table,
        seq_lens=jnp.asarray(starts + counts, jnp.int32),
        token_valid=valid,
        mode="prefill",
        impl=impl,
    )
    # head_dim 16: the query scale 0.25; Mistral's window where one is given.
    config = dataclasses.replace(TINY, model_type="mistral", sliding_window=window)
    assert config.attention_scale == 0.25 and config.attention_window == window
    one_pass = _cached_attention(q, positions, 1, kv, k_pool, v_pool, config)
    visited = []
    fori_loop = jax.lax.fori_loop

    def counting(lower, upper, body, carry):
        visited.append((int(lower), int(upper)))
        return fori_loop(lower, upper, body, carry)

    jax.lax.fori_loop = counting
    try:
        blocked = _cached_attention(
            q,
            positions,
            1,
            dataclasses.replace(kv, prefill_key_block=8),
            k_pool,
            v_pool,
            config,
        )
    finally:
        jax.lax.fori_loop = fori_loop
    # Blocks of 8 keys up to the longest row (36 keys: 5 of the table's 8 blocks), from the
    # first one a row's window reads (block 0: the row at 0).
    assert visited == [(0, 5)]
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(blocked, np.float32), np.asarray(one_pass, np.float32), atol=tolerance, rtol=0
    )
    assert not np.asarray(blocked[3]).any() and not np.asarray(blocked[1, 5:]).any()

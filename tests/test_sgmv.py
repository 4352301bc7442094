"""SGMV shrink / expand kernels against their plain-jnp references.

CPU: the Pallas kernels run with interpret=True. The same cases run compiled on a GPU (marked
``gpu``, skipped without one). Pools are filled with NaN wherever no adapter's rank-row lives
(page tails beyond the rank, free pages), page ids are shuffled, ranks are not multiples of any
block size, tokens are shuffled with ragged segments and base-only tokens, and outputs are
poisoned (NaN) before each run.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import lower_for_gpu, triton_kernels

from jaxlora.errors import AdapterError, ConfigError
from pallas_kernels.layout import NO_ADAPTER, SlotInfo, build_slot_metadata
from pallas_kernels.sgmv import (
    SgmvConfig,
    build_sgmv_metadata,
    build_sgmv_metadata_jnp,
    choose_per_token,
    choose_tiles,
    num_tiles_bound,
    sgmv_apply,
    sgmv_apply_reference,
    sgmv_delta,
    sgmv_delta_reference,
    sgmv_expand,
    sgmv_expand_reference,
    sgmv_shrink,
    sgmv_shrink_reference,
)

# Small blocks so that tiny shapes still cover several blocks per dimension, partial blocks,
# several K steps and several rank chunks.
SMALL = SgmvConfig(
    shrink_block_tokens=32,
    expand_block_tokens=16,
    shrink_block_n=16,
    shrink_block_k=16,
    expand_block_n=16,
    expand_col_steps=2,
    decode_shrink_rows=8,
    decode_block_k=16,
    decode_expand_block_n=16,
    decode_rank_chunk=4,
    decode_shrink_max_tokens=None,
    per_token_shrink_rows=4,
    per_token_block_k=16,
    per_token_expand_block_n=32,
)

INTERPRET = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]

# (in width, out widths of the group): q|k|v with GQA widths, gate|up, down.
GROUPS = {"qkv": (40, (32, 16, 16)), "gate_up": (40, (56, 56)), "down": (72, (40,))}

TOL = {"float32": 2e-5, "bfloat16": 1e-2}


@dataclasses.dataclass
class Problem:
    x: jax.Array
    y: jax.Array
    a_pool: jax.Array
    b_pools: tuple[jax.Array, ...]
    a_pages: jax.Array
    b_pages: jax.Array
    ranks: jax.Array
    scales: jax.Array
    token_slot: np.ndarray
    layer: jax.Array
    weights: tuple[int, ...]


def _alloc_pages(rng, needs, extra=5):
    """Shuffled page ids for each request (a list of page counts) in one pool of fitting size."""
    total = sum(needs) + extra
    ids = rng.permutation(total)
    out, cur = [], 0
    for n in needs:
        out.append(ids[cur : cur + n])
        cur += n
    return total, out


def make_problem(
    seed,
    *,
    num_tokens,
    in_width,
    out_widths,
    rows_per_page=4,
    max_pages=3,
    num_slots=6,
    num_layers=2,
    dtype=jnp.float32,
    no_adapter_frac=0.2,
    runs=False,
) -> Problem:
    rng = np.random.default_rng(seed)
    g_count = len(out_widths)
    weights = tuple(int(w) for w in np.sort(rng.choice(7, g_count, replace=False)))
    max_rank = rows_per_page * max_pages
    ranks = rng.integers(1, max_rank + 1, (num_slots, 7))
    ranks[rng.random((num_slots, 7)) < 0.15] = 0  # weights an adapter does not target
    ranks[0, weights[0]] = max_rank
    ranks[-1, weights[-1]] = 1
    ranks = ranks.astype(np.int32)
    n_pages = -(-ranks // rows_per_page)

    # A rows of every weight of the group live in one pool; B pools are shared between weights
    # of equal width (k and v), like the real layout.
    slot_weight = [(s, w) for s in range(num_slots) for w in weights]
    a_total, a_ids = _alloc_pages(rng, [n_pages[s, w] for s, w in slot_weight])
    a_pages = np.zeros((num_slots, 7, max_pages), np.int32)
    a_pool = np.full((num_layers, a_total, rows_per_page, in_width), np.nan, np.float32)
    for (s, w), ids in zip(slot_weight, a_ids, strict=True):
        a_pages[s, w, : len(ids)] = ids
        rows = rng.standard_normal((num_layers, ranks[s, w], in_width)) / np.sqrt(in_width)
        for i, page in enumerate(ids):
            chunk = rows[:, i * rows_per_page : (i + 1) * rows_per_page]
            a_pool[:, page, : chunk.shape[1]] = chunk

    b_pages = np.zeros((num_slots, 7, max_pages), np.int32)
    by_width = {}
    for g, width in enumerate(out_widths):
        by_width.setdefault(width, []).append(g)
    pool_of_g = {}
    for width, gs in by_width.items():
        reqs = [(s, weights[g]) for g in gs for s in range(num_slots)]
        total, ids_list = _alloc_pages(rng, [n_pages[s, w] for s, w in reqs])
        pool = np.full((num_layers, total, rows_per_page, width), np.nan, np.float32)
        for (s, w), ids in zip(reqs, ids_list, strict=True):
            b_pages[s, w, : len(ids)] = ids
            rows = rng.standard_normal((num_layers, ranks[s, w], width))
            for i, page in enumerate(ids):
                chunk = rows[:, i * rows_per_page : (i + 1) * rows_per_page]
                pool[:, page, : chunk.shape[1]] = chunk
        pool = jnp.asarray(pool, dtype)
        for g in gs:
            pool_of_g[g] = pool

    if runs:  # prefill-like: contiguous runs of one adapter, runs in random slot order
        slots = rng.integers(-1, num_slots, max(1, num_tokens // 5))
        cuts = np.sort(rng.choice(np.arange(1, num_tokens), len(slots) - 1, replace=False))
        token_slot = np.concatenate(
            [np.full(n, s) for s, n in zip(slots, np.diff([0, *cuts, num_tokens]), strict=True)]
        )
    else:  # skewed random assignment, shuffled order
        p = 1.0 / np.arange(1, num_slots + 1)
        token_slot = rng.choice(num_slots, num_tokens, p=p / p.sum())
        token_slot[rng.random(num_tokens) < no_adapter_frac] = NO_ADAPTER
    token_slot = token_slot.astype(np.int32)

    return Problem(
        x=jnp.asarray(rng.standard_normal((num_tokens, in_width)), dtype),
        y=jnp.asarray(rng.standard_normal((num_tokens, sum(out_widths))), dtype),
        a_pool=jnp.asarray(a_pool, dtype),
        b_pools=tuple(pool_of_g[g] for g in range(g_count)),
        a_pages=jnp.asarray(a_pages),
        b_pages=jnp.asarray(b_pages),
        ranks=jnp.asarray(ranks),
        scales=jnp.asarray(rng.uniform(0.5, 2.0, (num_slots, 7)), jnp.float32),
        token_slot=token_slot,
        layer=jnp.int32(rng.integers(num_layers)),
        weights=weights,
    )


def _model_width_problem(seed, num_tokens):
    """bf16 q|k|v at model-like widths (1,024 in; 1,024 / 256 / 256 out), pages of 16 rank rows,
    up to rank 64, 24 slots."""
    return make_problem(
        seed,
        num_tokens=num_tokens,
        in_width=1024,
        out_widths=(1024, 256, 256),
        rows_per_page=16,
        max_pages=4,
        num_slots=24,
        dtype=jnp.bfloat16,
    )


def _poison_allocator(nbytes):
    """Leaves NaN in freed device memory so that a fresh kernel output starts as garbage.

    The interpreter already starts outputs as NaN; on a GPU this makes the allocator hand the
    kernel memory full of NaN instead of whatever zeros a fresh process happens to have.
    """
    junk = jnp.full((max(1, nbytes // 4) * 4,), jnp.nan, jnp.float32)
    junk.block_until_ready()
    del junk


def _rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.isfinite(out).all(), "kernel output holds NaN/inf (an unwritten or unmasked entry)"
    return np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30)


def _shrink_inputs(prob):
    """sgmv_shrink's positional inputs for ``prob``: x, the A pool and tables, slots, layer."""
    return (
        prob.x,
        prob.a_pool,
        prob.a_pages,
        prob.ranks,
        jnp.asarray(prob.token_slot),
        prob.layer,
    )


def _run_shrink(prob, config, interpret, meta="host", per_token=False):
    kernel_meta = None
    if meta == "host":
        kernel_meta = build_sgmv_metadata(prob.token_slot, prob.a_pages.shape[0], config=config)
    _poison_allocator(prob.x.shape[0] * prob.a_pages.shape[2] * 64 * 4)

    def shrink(x, a_pool, a_pages, ranks, token_slot, layer, kernel_meta, *, interpret):
        return sgmv_shrink(
            x,
            a_pool,
            a_pages,
            ranks,
            token_slot,
            layer,
            weights=prob.weights,
            kernel_meta=kernel_meta,
            config=config,
            per_token=per_token,
            interpret=interpret,
        )

    args = (*_shrink_inputs(prob), kernel_meta)
    if interpret:  # the same call must also lower for the GPU
        assert triton_kernels(lower_for_gpu(functools.partial(shrink, interpret=False), *args)) == 1
    return shrink(*args, interpret=interpret)


def _run_expand(prob, v, config, interpret, meta="host", per_token=False):
    kernel_meta = None
    if meta == "host":
        kernel_meta = build_sgmv_metadata(prob.token_slot, prob.b_pages.shape[0], config=config)

    def expand(y, v, b_pools, b_pages, ranks, scales, token_slot, layer, kernel_meta, *, interpret):
        return sgmv_expand(
            y,
            v,
            b_pools,
            b_pages,
            ranks,
            scales,
            token_slot,
            layer,
            weights=prob.weights,
            kernel_meta=kernel_meta,
            config=config,
            per_token=per_token,
            interpret=interpret,
        )

    args = (
        prob.y,
        v,
        prob.b_pools,
        prob.b_pages,
        prob.ranks,
        prob.scales,
        jnp.asarray(prob.token_slot),
        prob.layer,
        kernel_meta,
    )
    if interpret:
        assert triton_kernels(lower_for_gpu(functools.partial(expand, interpret=False), *args)) == 1
    return expand(*args, interpret=interpret)


def _reference(prob):
    ts = jnp.asarray(prob.token_slot)
    v = sgmv_shrink_reference(
        prob.x, prob.a_pool, prob.a_pages, prob.ranks, ts, prob.layer, weights=prob.weights
    )
    y = sgmv_expand_reference(
        prob.y,
        v,
        prob.b_pools,
        prob.b_pages,
        prob.ranks,
        prob.scales,
        ts,
        prob.layer,
        weights=prob.weights,
    )
    return v, y


def _check(prob, v, y, v_ref, y_ref, dtype_name):
    tol = TOL[dtype_name]
    assert _rel_err(v, v_ref) < min(tol, 1e-4)  # products of equal dtypes are exact in f32
    base_only = prob.token_slot < 0
    np.testing.assert_array_equal(np.asarray(v)[base_only], 0.0)
    # Columns beyond each token's rank are exactly zero.
    ranks = np.asarray(prob.ranks)
    rank_cols = v.shape[2]
    for g, w in enumerate(prob.weights):
        r = np.where(base_only, 0, ranks[np.maximum(prob.token_slot, 0), w])
        beyond = np.arange(rank_cols)[None, :] >= r[:, None]
        np.testing.assert_array_equal(np.asarray(v)[:, g, :][beyond], 0.0)
    assert _rel_err(y, y_ref) < tol
    assert y.dtype == prob.y.dtype
    # Base-only tokens are left untouched, bit for bit.
    np.testing.assert_array_equal(np.asarray(y)[base_only], np.asarray(prob.y)[base_only])


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------


def _check_metadata(meta, token_slot, num_slots, config):
    t = len(token_slot)
    tile_sizes = {"shrink": config.shrink_block_tokens, "expand": config.expand_block_tokens}
    expected = {"sorted_tokens": (t,)}
    for kind, bt in tile_sizes.items():
        nt = num_tiles_bound(t, num_slots, bt)
        expected.update({f"{kind}_tile_{f}": (nt,) for f in ("start", "size", "slot")})
        expected[f"{kind}_num_tiles"] = (1,)
    assert {k: v.shape for k, v in meta.items()} == expected
    assert all(v.dtype == np.int32 for v in meta.values())
    order = meta["sorted_tokens"]
    np.testing.assert_array_equal(np.sort(order), np.arange(t))
    keys = np.where(token_slot < 0, num_slots, token_slot)[order]
    assert (np.diff(keys) >= 0).all()  # sorted by slot, base-only last
    for kind, bt in tile_sizes.items():
        covered = np.zeros(t, int)
        sizes = meta[f"{kind}_tile_size"]
        used = sizes > 0
        first_unused = len(used) if used.all() else int(np.argmin(used))
        assert not used[first_unused:].any()  # used tiles come first
        assert meta[f"{kind}_num_tiles"][0] == first_unused
        for j in np.flatnonzero(used):
            assert 1 <= sizes[j] <= bt
            start = meta[f"{kind}_tile_start"][j]
            toks = order[start : start + sizes[j]]
            covered[toks] += 1
            assert (token_slot[toks] == meta[f"{kind}_tile_slot"][j]).all()
        np.testing.assert_array_equal(covered, 1)


@pytest.mark.parametrize("case", ["random", "all_base", "one_slot", "distinct", "single"])
@pytest.mark.parametrize("bt", [16, 64])
def test_metadata_builders(case, bt):
    rng = np.random.default_rng(bt)
    num_slots = 9
    token_slot = {
        "random": rng.integers(-1, num_slots, 150),
        "all_base": np.full(40, NO_ADAPTER),
        "one_slot": np.full(130, 3),
        "distinct": rng.permutation(num_slots)[:num_slots],
        "single": np.array([4]),
    }[case].astype(np.int32)
    config = SgmvConfig(shrink_block_tokens=bt, expand_block_tokens=16)
    meta = build_sgmv_metadata(token_slot, num_slots, config=config)
    _check_metadata(meta, token_slot, num_slots, config)
    jitted = jax.jit(lambda ts: build_sgmv_metadata_jnp(ts, num_slots, config=config))
    meta_jnp = jitted(jnp.asarray(token_slot))
    for key, value in meta.items():
        np.testing.assert_array_equal(np.asarray(meta_jnp[key]), value, err_msg=key)


def test_metadata_tile_bound_is_tight():
    # Every token its own slot: one tile per token, the bound's worst case.
    token_slot = np.arange(20, dtype=np.int32)
    config = SgmvConfig(shrink_block_tokens=32, expand_block_tokens=16)
    meta = build_sgmv_metadata(token_slot, 20, config=config)
    assert (meta["shrink_tile_size"] == 1).all() and (meta["expand_tile_size"] == 1).all()
    # One slot: ceil(T / bt) used tiles, the rest of the static bound unused.
    meta = build_sgmv_metadata(np.zeros(40, np.int32), 20, config=config)
    np.testing.assert_array_equal(meta["expand_tile_size"][:3], [16, 16, 8])
    assert (meta["expand_tile_size"][3:] == 0).all()
    np.testing.assert_array_equal(meta["shrink_tile_size"][:2], [32, 8])
    assert (meta["shrink_tile_size"][2:] == 0).all()


def test_metadata_rejects_bad_slots():
    with pytest.raises(AdapterError, match=r"token_slot\[2\] = 7"):
        build_sgmv_metadata(np.array([0, 1, 7], np.int32), 4)
    with pytest.raises(AdapterError, match="token_slot"):
        build_sgmv_metadata(np.array([0, -2], np.int32), 4)


def test_slot_metadata_packs_cached_rows_into_fresh_arrays():
    info = SlotInfo(
        ranks=(5, 0, 1, 16, 5, 5, 5),
        scales=(0.5, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5),
        a_pages=((3, 9), (), (4,), (1, 2, 5, 6), (7, 8), (10, 11), (12, 13)),
        b_pages=((0, 2), (), (6,), (3, 4, 7, 8), (1, 5), (9, 10), (11, 12)),
    )
    kw = dict(max_slots=3, max_rank=16, rows_per_page=4)
    first = build_slot_metadata([None, info], **kw)
    np.testing.assert_array_equal(first["ranks"][1], info.ranks)
    np.testing.assert_array_equal(first["scales"][1], [0.5, 0.0, 2.0, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(first["a_pages"][1, 3], [1, 2, 5, 6])
    np.testing.assert_array_equal(first["b_pages"][1, 0], [0, 2, 0, 0])
    assert not first["ranks"][[0, 2]].any()
    first["ranks"][1] = -1  # a step's arrays are its own: the cached rows stay intact
    again = build_slot_metadata([info, None, info], **kw)
    np.testing.assert_array_equal(again["ranks"][0], info.ranks)
    np.testing.assert_array_equal(again["a_pages"][2], again["a_pages"][0])
    with pytest.raises(ValueError, match="slot 1 weight q_proj: rank 5 needs 2 pages"):
        build_slot_metadata(
            [info, dataclasses.replace(info, a_pages=((3,),) + info.a_pages[1:])], **kw
        )
    with pytest.raises(ValueError, match="slot 0 weight o_proj: rank 16 > max_rank 8"):
        build_slot_metadata([info], max_slots=1, max_rank=8, rows_per_page=4)


# ------------------------------------------------------------------------------------------------
# kernels against the references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_kernels_match_reference(regime, group, dtype_name, interpret):
    in_width, out_widths = GROUPS[group]
    num_tokens = 11 if regime == "decode" else 53
    config = dataclasses.replace(SMALL, decode_max_tokens=16)
    assert config.regime(num_tokens) == regime
    seed = zlib.crc32(f"{regime}-{group}-{dtype_name}".encode())
    prob = make_problem(
        seed,
        num_tokens=num_tokens,
        in_width=in_width,
        out_widths=out_widths,
        dtype=jnp.dtype(dtype_name),
        runs=regime == "prefill",
    )
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret)
    y = _run_expand(prob, v_ref, config, interpret)
    _check(prob, v, y, v_ref, y_ref, dtype_name)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    "num_tokens, max_pages, regimes",
    [
        (9, 2, ("decode", "decode")),
        (40, 1, ("decode", "prefill")),
        # 40 tokens x 96 v columns: past the per-token shrink's token rows, tiles again
        (40, 2, ("prefill", "prefill")),
        (70, 2, ("prefill", "prefill")),
    ],
)
def test_default_config_and_jnp_metadata(num_tokens, max_pages, regimes, interpret):
    """Default block sizes (clipped to tiny shapes), where the shrink and the expand may run
    different regimes at one T; prefill metadata built inside the call."""
    prob = make_problem(
        5,
        num_tokens=num_tokens,
        in_width=48,
        out_widths=(48, 24, 24),
        rows_per_page=16,
        max_pages=max_pages,
    )
    config = SgmvConfig()
    columns = 3 * 16 * max_pages
    assert (
        config.regime(num_tokens, "shrink", columns=columns),
        config.regime(num_tokens, "expand"),
    ) == regimes
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret, meta=None)
    y = _run_expand(prob, v, config, interpret, meta=None)
    _check(prob, v, y, v_ref, y_ref, "float32")


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("split", [None, 4])
def test_prefill_shrink_split_k(split, deterministic, interpret):
    """The reduction split over programs: atomic adds into a zeroed v, or (deterministic) float32
    partials summed in one fixed order afterwards."""
    prob = make_problem(
        11, num_tokens=40, in_width=72, out_widths=(40,), dtype=jnp.bfloat16, runs=True
    )
    config = dataclasses.replace(
        SMALL,
        decode_max_tokens=0,
        shrink_split_k=split,
        target_programs=10_000,
        deterministic=deterministic,
    )
    v_ref, _ = _reference(prob)
    v = _run_shrink(prob, config, interpret)
    assert _rel_err(v, v_ref) < 1e-4
    np.testing.assert_array_equal(np.asarray(v)[prob.token_slot < 0], 0.0)
    if deterministic:
        # The same partials in the same order as the atomic adds of programs run one after
        # another (the interpreter; on a GPU their order varies): the same bits.
        atomic = _run_shrink(prob, dataclasses.replace(config, deterministic=False), interpret)
        if interpret:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(atomic))
        else:
            assert _rel_err(v, atomic) < 1e-5


def test_shrink_regime_by_token_rows():
    """The per-token shrink reads each token's A rows again: it runs up to
    ``decode_shrink_max_tokens`` tokens and ``decode_shrink_max_token_rows`` token rows."""
    config = SgmvConfig()
    assert config.regime(64, "shrink", columns=32) == "decode"  # 2,048 token rows
    assert config.regime(64, "shrink", columns=33) == "prefill"
    assert config.regime(16, "shrink", columns=128) == "decode"
    assert config.regime(16, "shrink", columns=192) == "prefill"  # rank 64 q|k|v
    assert config.regime(65, "shrink", columns=1) == "prefill"  # past decode_shrink_max_tokens
    unlimited = SgmvConfig(decode_shrink_max_token_rows=None)
    assert unlimited.regime(64, "shrink", columns=192) == "decode"
    assert unlimited.regime(65, "shrink", columns=1) == "prefill"
    assert config.regime(16, "expand") == "decode"
    assert config.regime(17, "expand") == "prefill"
    with pytest.raises(ConfigError, match="the shrink's columns must be an int >= 1, got None"):
        config.regime(16, "shrink")
    with pytest.raises(ConfigError, match="kernel must be 'shrink' or 'expand', got 'gather'"):
        config.regime(16, "gather")


def test_shrink_waves_by_tokens():
    """Above ``shrink_large_tokens`` the shrink aims at ``shrink_large_waves`` programs an SM:
    fewer, longer K splits. One slot, one rank-16 weight, 64-wide K steps over 1024 (16 steps,
    splits of up to 8): 2,048 tokens make 128 tiles, split 2 for one wave of 132 SMs, split 8
    for four; 1,024 tokens (64 tiles) keep the four waves."""

    def kernel_name(num_tokens, **fields):
        prob = make_problem(
            7,
            num_tokens=num_tokens,
            in_width=1024,
            out_widths=(1024,),
            rows_per_page=16,
            max_pages=1,
            num_slots=2,
            dtype=jnp.bfloat16,
        )
        prob.token_slot = np.zeros(num_tokens, np.int32)
        config = SgmvConfig(shrink_block_k=64, **fields)
        shrink = functools.partial(
            sgmv_shrink, weights=prob.weights, config=config, interpret=False
        )
        text = lower_for_gpu(shrink, *_shrink_inputs(prob))
        (name,) = set(re.findall(r"sgmv_shrink_prefill_\w+", text))
        return name

    assert SgmvConfig().shrink_target(1024) == 4 * 132
    assert SgmvConfig().shrink_target(1025) == 132
    assert "_ks2p_" in kernel_name(2048)
    assert "_ks8p_" in kernel_name(2048, shrink_large_waves=4)
    assert "_ks8p_" in kernel_name(1024)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_large_token_waves_give_the_reference(interpret):
    """Every T counted large (``shrink_large_tokens`` 0): the split follows
    ``shrink_large_waves`` (none for one wave of 6 programs, 4-way for 8 waves: 2 tiles x 3
    column blocks, 9 K steps), and v is the reference's either way."""
    prob = _ragged_problem(19, "one_slot", in_width=136, permutation_seed=0)
    config = dataclasses.replace(
        SMALL,
        decode_max_tokens=0,
        target_programs=6,
        shrink_waves=8,
        shrink_large_waves=1,
        shrink_large_tokens=0,
    )
    v_ref, _ = _reference(prob)
    for fields in ({}, {"shrink_large_tokens": 1024}):
        v = _run_shrink(prob, dataclasses.replace(config, **fields), interpret)
        assert _rel_err(v, v_ref) < TOL["bfloat16"]


def _ragged_problem(seed, assignment, *, in_width, permutation_seed):
    """37 bf16 tokens over q|k|v widths (56, 40, 40) that no power-of-two block divides, their
    slots by ``assignment``: all one slot, 37 distinct of 40 slots, or 5 slots with every third
    token base-only."""
    prob = make_problem(
        seed,
        num_tokens=37,
        in_width=in_width,
        out_widths=(56, 40, 40),
        dtype=jnp.bfloat16,
        num_slots=40,
    )
    prob.token_slot = {
        "one_slot": np.full(37, 2),
        "distinct": np.random.default_rng(permutation_seed).permutation(40)[:37],
        "mixed": np.where(np.arange(37) % 3 == 0, NO_ADAPTER, np.arange(37) % 5),
    }[assignment].astype(np.int32)
    return prob


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("assignment", ["one_slot", "distinct", "mixed"])
@pytest.mark.parametrize("target_programs", [1, 6, 40])
@pytest.mark.parametrize("deterministic", [False, True])
def test_prefill_run_time_split_and_column_runs(
    assignment, target_programs, deterministic, interpret
):
    """The prefill kernels pick their K split (shrink) and column run (expand) at run time from
    the tiles in use; every choice, with column runs that do not divide a weight's blocks, gives
    the reference result."""
    prob = _ragged_problem(13, assignment, in_width=136, permutation_seed=0)
    config = dataclasses.replace(
        SMALL,
        decode_max_tokens=0,
        target_programs=target_programs,
        shrink_waves=2,
        expand_waves=1,
        expand_col_steps=4,
        deterministic=deterministic,
    )
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret)
    y = _run_expand(prob, v_ref, config, interpret)
    _check(prob, v, y, v_ref, y_ref, "bfloat16")


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("assignment", ["one_slot", "distinct", "mixed"])
@pytest.mark.parametrize("col_steps", [1, 4])
def test_prefill_expand_prefetches_y(assignment, col_steps, interpret):
    """``expand_prefetch_y``: each column step loads the next step's y tile before its dot. Runs
    of 1 and up to 4 column steps over widths that are not a multiple of the block (56, 40: the
    last block ragged, the last run short), tokens with and without adapters: the reference's y
    within bf16's tolerance, and the y of the loop without the prefetch bit for bit."""
    prob = _ragged_problem(17, assignment, in_width=40, permutation_seed=1)
    config = dataclasses.replace(
        SMALL, decode_max_tokens=0, expand_waves=1, target_programs=1, expand_col_steps=col_steps
    )
    prefetching = dataclasses.replace(config, expand_prefetch_y=True)
    v_ref, y_ref = _reference(prob)
    y = _run_expand(prob, v_ref, prefetching, interpret)
    _check(prob, v_ref, y, v_ref, y_ref, "bfloat16")
    plain = _run_expand(prob, v_ref, config, interpret)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_ranks_up_to_128_in_one_batch(regime, interpret):
    prob = make_problem(
        3,
        num_tokens=8 if regime == "decode" else 40,
        in_width=32,
        out_widths=(24, 24),
        rows_per_page=16,
        max_pages=8,
        num_slots=4,
    )
    config = dataclasses.replace(SMALL, decode_max_tokens=8)
    assert int(jnp.max(prob.ranks)) == 128 and int(jnp.min(prob.ranks[:, 0])) >= 0
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret)
    y = _run_expand(prob, v_ref, config, interpret)
    _check(prob, v, y, v_ref, y_ref, "float32")


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_expand_ignores_garbage_beyond_rank_and_all_base_tokens(regime, interpret):
    prob = make_problem(
        7, num_tokens=10 if regime == "decode" else 33, in_width=40, out_widths=(32, 16, 16)
    )
    config = dataclasses.replace(SMALL, decode_max_tokens=10)
    v_ref, y_ref = _reference(prob)
    ranks = np.asarray(prob.ranks)
    r = ranks[np.maximum(prob.token_slot, 0)][:, list(prob.weights)]  # (T, G)
    beyond = np.arange(v_ref.shape[2])[None, None, :] >= r[:, :, None]
    v_garbage = jnp.where(jnp.asarray(beyond), jnp.nan, v_ref)
    y = _run_expand(prob, v_garbage, config, interpret)
    assert _rel_err(y, y_ref) < TOL["float32"]
    # No adapter anywhere: y comes back unchanged, v all zero.
    prob.token_slot = np.full_like(prob.token_slot, NO_ADAPTER)
    y = _run_expand(prob, v_ref, config, interpret)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(prob.y))
    np.testing.assert_array_equal(np.asarray(_run_shrink(prob, config, interpret)), 0.0)


# ------------------------------------------------------------------------------------------------
# per token at any T (per_token=True, chosen on the host by choose_per_token)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    "group, dtype_name, knobs",
    # every group and both dtypes; the test knobs (several K steps, rank rows and column blocks)
    # and the defaults (clipped to the tiny widths)
    [
        ("qkv", "bfloat16", "small"),
        ("gate_up", "float32", "small"),
        ("down", "bfloat16", "small"),
        ("qkv", "float32", "default"),
        # expand programs walking 4 / 7 tokens (53 tokens: the last program's run is short)
        ("qkv", "bfloat16", "walk4"),
        ("gate_up", "float32", "walk7"),
    ],
)
def test_per_token_kernels_match_reference(group, dtype_name, knobs, interpret):
    """``per_token=True`` where T takes the prefill tiles: the decode kernels with the
    ``per_token_*`` knobs, tokens in any order (distinct slots, repeated slots, base-only
    tokens), ranks not a multiple of the rank rows, no metadata; the tiles' result."""
    in_width, out_widths = GROUPS[group]
    num_tokens = 53
    config = dataclasses.replace(SMALL, decode_max_tokens=16)
    if knobs == "default":
        config = SgmvConfig()
    elif knobs.startswith("walk"):
        # one rank chunk holds every rank row (the walking kernel's case)
        tokens = int(knobs[4:])
        config = dataclasses.replace(
            config, decode_rank_chunk=64, per_token_expand_tokens=tokens, target_programs=1
        )
    assert config.regime(num_tokens, "shrink", columns=1_000_000) == "prefill"
    assert config.regime(num_tokens, "shrink", columns=1_000_000, per_token=True) == "per_token"
    assert config.regime(num_tokens, per_token=True) == "per_token"
    assert config.regime(1, per_token=True) == "decode"  # decode stays decode
    prob = make_problem(
        zlib.crc32(f"per-token-{group}-{dtype_name}-{knobs}".encode()),
        num_tokens=num_tokens,
        in_width=in_width,
        out_widths=out_widths,
        dtype=jnp.dtype(dtype_name),
        num_slots=40,
    )
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret, meta=None, per_token=True)
    y = _run_expand(prob, v_ref, config, interpret, meta=None, per_token=True)
    _check(prob, v, y, v_ref, y_ref, dtype_name)
    y_tiles = _run_expand(prob, v_ref, config, interpret)
    assert _rel_err(y, y_tiles) < TOL[dtype_name]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("walk", [1, 3])
def test_per_token_delta_writes_every_element(walk, interpret):
    """The model's delta form per token: float32 zeros for base-only tokens and untargeted
    weights, every other element the reference's; also with expand programs walking 3 tokens."""
    prob, kw, pools = _group_case("per-token-delta", "qkv", 40, jnp.bfloat16)
    ts = jnp.asarray(prob.token_slot)
    kw = dict(kw, kernel_meta=None, per_token=True)
    kw["config"] = dataclasses.replace(
        kw["config"], per_token_expand_tokens=walk, target_programs=1
    )
    if walk > 1:  # one rank chunk for every rank row: the walking kernel's case
        kw["config"] = dataclasses.replace(kw["config"], decode_rank_chunk=64)
    lowered = lower_for_gpu(
        lambda x, t: sgmv_delta(x, *pools, t, prob.layer, **kw, interpret=False), prob.x, ts
    )
    assert "sgmv_shrink_per_token_rows4_bk16_" in lowered
    assert "sgmv_expand_delta_per_token_bn32_" in lowered
    assert (f"_t{walk}_" in lowered) == (walk > 1)
    delta = sgmv_delta(prob.x, *pools, ts, prob.layer, **kw, interpret=interpret)
    delta_ref = sgmv_delta_reference(prob.x, *pools, ts, prob.layer, weights=prob.weights)
    assert _rel_err(delta, delta_ref) < TOL["bfloat16"]
    np.testing.assert_array_equal(np.asarray(delta)[prob.token_slot < 0], 0.0)


def ranks_of(num_slots, rank):
    ranks = np.zeros((num_slots, 7), np.int32)
    ranks[:, [0, 2, 5]] = rank  # an adapter's rank: its largest weight's
    ranks[:, 1] = 1
    return ranks


def test_choose_per_token_follows_the_batch():
    """Per token while tokens per adapter x mean rank <= per_token_max_rows (32)."""
    config = SgmvConfig()
    rng = np.random.default_rng(0)

    distinct = rng.permutation(300).astype(np.int32)
    assert choose_per_token(distinct, ranks_of(300, 16), config=config)  # 1 x 16
    assert choose_per_token(distinct, ranks_of(300, 32), config=config)  # 1 x 32
    assert not choose_per_token(distinct, ranks_of(300, 64), config=config)  # 1 x 64
    pairs = np.repeat(np.arange(150), 2).astype(np.int32)
    assert choose_per_token(pairs, ranks_of(150, 16), config=config)  # 2 x 16
    assert not choose_per_token(pairs, ranks_of(150, 17), config=config)  # 2 x 17
    one = np.zeros(300, np.int32)
    assert not choose_per_token(one, ranks_of(1, 8), config=config)  # 300 x 8
    assert not choose_per_token(np.full(300, NO_ADAPTER, np.int32), ranks_of(1, 8))
    # Base-only tokens do not count; the mean rank is over the tokens with an adapter.
    mixed = np.full(300, NO_ADAPTER, np.int32)
    mixed[::3] = np.arange(100)
    ranks = ranks_of(100, 16)
    ranks[:50, 0] = 64  # half the tokens' adapters at rank 64: mean 40
    assert choose_per_token(mixed, ranks_of(100, 32), config=config)
    assert not choose_per_token(mixed, ranks, config=config)
    assert choose_per_token(mixed, ranks, config=SgmvConfig(per_token_max_rows=40))
    assert not choose_per_token(
        distinct, ranks_of(300, 8), config=SgmvConfig(per_token_max_rows=None)
    )
    with pytest.raises(AdapterError, match="1-D int array"):
        choose_per_token(np.zeros((2, 3), np.int32), ranks_of(1, 8))
    with pytest.raises(AdapterError, match=r"token_slot\[1\] = -2; expected -1 \(no adapter\)"):
        choose_per_token(np.array([0, -2, 1], np.int32), ranks_of(2, 8))
    with pytest.raises(AdapterError, match=r"ranks must be \(S, 7\) with a row for every slot"):
        choose_per_token(distinct, ranks_of(10, 8))


def _lower_apply(prob, **kw):
    """``sgmv_apply`` on ``prob`` lowered for the GPU (the kernels' names and count)."""
    pools = (prob.a_pool, prob.b_pools, prob.a_pages, prob.b_pages, prob.ranks, prob.scales)
    return lower_for_gpu(
        lambda x, y, t: sgmv_apply(x, y, *pools, t, prob.layer, weights=prob.weights, **kw),
        prob.x,
        prob.y,
        jnp.asarray(prob.token_slot),
    )


def test_choose_tiles_follows_the_batch():
    """Shrink tiles of 64 tokens (K steps of 128) from 32 tokens an adapter; expand tiles of 64
    from 64 tokens an adapter of mean rank >= 64; otherwise the config itself."""
    config = SgmvConfig()

    def tiles(token_slot, ranks, config=config):
        chosen = choose_tiles(np.asarray(token_slot, np.int32), ranks, config=config)
        return chosen.shrink_block_tokens, chosen.shrink_block_k, chosen.expand_block_tokens

    one = np.zeros(4096, np.int32)
    assert tiles(one, ranks_of(1, 16)) == (64, 128, 16)  # a prompt of rank 16
    assert tiles(one[:256], ranks_of(1, 64)) == (64, 128, 64)  # ... of rank 64
    assert choose_tiles(one[:255], ranks_of(1, 64), config=config) is config  # < 256 tokens
    runs_of_32 = np.repeat(np.arange(32), 32)
    assert tiles(runs_of_32, ranks_of(32, 64)) == (64, 128, 16)  # 32 an adapter
    assert tiles(np.repeat(np.arange(16), 64), ranks_of(16, 64)) == (64, 128, 64)
    runs_of_31 = np.repeat(np.arange(32), 31)
    assert choose_tiles(runs_of_31, ranks_of(32, 64), config=config) is config
    assert choose_tiles(np.arange(300, dtype=np.int32), ranks_of(300, 8)) == SgmvConfig()
    assert choose_tiles(np.full(300, NO_ADAPTER, np.int32), ranks_of(1, 8)) == SgmvConfig()
    # Base-only tokens do not count; the mean rank is over the tokens with an adapter.
    prompt_and_base = np.concatenate([np.zeros(64), np.full(200, NO_ADAPTER)])
    assert tiles(prompt_and_base, ranks_of(1, 64)) == (64, 128, 64)
    mixed_ranks = ranks_of(2, 64)
    mixed_ranks[1] = ranks_of(1, 16)[0]
    half_and_half = np.repeat([0, 1], 128)
    assert tiles(half_and_half, mixed_ranks) == (64, 128, 16)  # mean rank 40
    never = SgmvConfig(large_tiles_min_tokens=None)
    assert choose_tiles(one, ranks_of(1, 64), config=never) is never
    no_expand = SgmvConfig(large_expand_min_tokens=None)
    assert tiles(one, ranks_of(1, 64), config=no_expand) == (64, 128, 16)
    custom = SgmvConfig(large_shrink_block_tokens=128, large_shrink_block_k=64)
    assert tiles(one, ranks_of(1, 8), config=custom) == (128, 64, 16)
    with pytest.raises(AdapterError, match=r"choose_tiles: token_slot\[1\] = -2"):
        choose_tiles(np.array([0, -2, 1], np.int32), ranks_of(2, 8))
    with pytest.raises(AdapterError, match=r"choose_tiles: ranks must be \(S, 7\)"):
        choose_tiles(np.arange(20, dtype=np.int32), ranks_of(10, 8))
    with pytest.raises(ConfigError, match="'large_shrink_block_tokens': expected a power of two"):
        SgmvConfig(large_shrink_block_tokens=48)
    with pytest.raises(ConfigError, match="'large_tiles_min_tokens': expected None or an int"):
        SgmvConfig(large_tiles_min_tokens=-1)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_large_tiles_match_reference(interpret):
    """A batch of prompts (runs of one adapter, base-only runs between) in the larger tiles
    that ``choose_tiles`` picks for it: the reference result, from launches named after the
    chosen tile sizes."""
    prob = make_problem(
        zlib.crc32(b"large-tiles"),
        num_tokens=150,
        in_width=40,
        out_widths=(32, 16, 16),
        num_slots=3,
        dtype=jnp.bfloat16,
        runs=True,
    )
    base = dataclasses.replace(
        SMALL,
        large_tiles_min_tokens=16,
        large_tiles_min_batch=100,
        large_shrink_block_k=32,
        large_expand_min_tokens=16,
        large_expand_min_rank=1,
        large_expand_block_tokens=32,
    )
    config = choose_tiles(prob.token_slot, np.asarray(prob.ranks), config=base)
    assert (config.shrink_block_tokens, config.shrink_block_k) == (64, 32)
    assert config.expand_block_tokens == 32
    assert config.regime(150, "shrink", columns=1) == "prefill"
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, config, interpret)
    y = _run_expand(prob, v_ref, config, interpret)
    _check(prob, v, y, v_ref, y_ref, "bfloat16")
    meta = build_sgmv_metadata(prob.token_slot, 3, config=config)
    text = _lower_apply(prob, kernel_meta=meta, config=config)
    assert "sgmv_shrink_prefill_bt64_" in text and "sgmv_expand_prefill_bt32_" in text


def test_per_token_lowers_for_the_gpu_at_model_widths():
    """The per-token launches at T = 4,096 (the grid's distinct rows) with the default knobs:
    two Triton kernels, named after them."""
    prob = _model_width_problem(11, 4096)
    config = SgmvConfig()
    text = _lower_apply(prob, config=config, per_token=True)
    assert triton_kernels(text) == 2
    assert "sgmv_shrink_per_token_rows4_bk512_w4_s4" in text
    assert "sgmv_expand_per_token_bn1024_rc64_t2_w4_s3" in text  # two tokens a program
    walking = dataclasses.replace(config, per_token_expand_tokens=8)
    text = _lower_apply(prob, config=walking, per_token=True)
    assert triton_kernels(text) == 2
    assert "sgmv_expand_per_token_bn1024_rc64_t8_w4_s3" in text
    # T = 64: two tokens a program would leave 32 x 3 column blocks, fewer programs than SMs.
    text = _lower_apply(_model_width_problem(12, 64), config=config, per_token=True)
    assert "sgmv_expand_per_token_bn1024_rc64_w4_s3" in text


def test_traced_layer_inside_scan():
    """The model's use: one shrink + expand per layer inside lax.scan, layer traced."""
    prob = make_problem(9, num_tokens=30, in_width=40, out_widths=(56, 56), num_layers=3)
    config = dataclasses.replace(SMALL, decode_max_tokens=0)
    ts = jnp.asarray(prob.token_slot)
    meta = build_sgmv_metadata(prob.token_slot, prob.a_pages.shape[0], config=config)

    def run(shrink, expand):
        def step(y, layer):
            v = shrink(prob.x, prob.a_pool, prob.a_pages, prob.ranks, ts, layer)
            y = expand(y, v, prob.b_pools, prob.b_pages, prob.ranks, prob.scales, ts, layer)
            return y, None

        return jax.jit(lambda y: jax.lax.scan(step, y, jnp.arange(3, dtype=jnp.int32))[0])(prob.y)

    kw = dict(weights=prob.weights, kernel_meta=meta, config=config, interpret=True)
    y = run(lambda *a: sgmv_shrink(*a, **kw), lambda *a: sgmv_expand(*a, **kw))
    y_ref = run(
        lambda *a: sgmv_shrink_reference(*a, weights=prob.weights),
        lambda *a: sgmv_expand_reference(*a, weights=prob.weights),
    )
    assert _rel_err(y, y_ref) < TOL["float32"]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 48, 128, 300])
def test_gpu_realistic_shapes_default_config(num_tokens):
    """Compiled kernels at model-like widths with the default (GPU-tuned) config."""
    prob = _model_width_problem(num_tokens, num_tokens)
    v_ref, y_ref = _reference(prob)
    v = _run_shrink(prob, SgmvConfig(), False)
    y = _run_expand(prob, v, SgmvConfig(), False)
    _check(prob, v, y, v_ref, y_ref, "bfloat16")


@pytest.mark.parametrize("interpret", INTERPRET)
def test_deterministic_split_repeats_its_bits(interpret):
    """One adapter's 128 tokens at a 2048-wide input: the fewest tiles, so the shrink splits its
    reduction the most (16 ways). With SgmvConfig.deterministic every run gives the same bits,
    and the reference result. Compiled, the runs are what this tests (the order of atomic adds
    follows the GPU's scheduling); interpreted, programs run in order and it checks the path."""
    prob = make_problem(
        7,
        num_tokens=128,
        in_width=2048,
        out_widths=(256, 64, 64),
        rows_per_page=16,
        max_pages=1,
        num_slots=4,
        dtype=jnp.bfloat16,
    )
    prob.token_slot = np.zeros(128, np.int32)
    config = SgmvConfig(deterministic=True)
    v_ref, _ = _reference(prob)
    runs = [np.asarray(_run_shrink(prob, config, interpret)) for _ in range(2 if interpret else 8)]
    assert _rel_err(runs[0], v_ref) < 1e-4
    assert all(np.array_equal(runs[0], v) for v in runs[1:])


@pytest.mark.parametrize("num_tokens", [1, 16, 48, 128, 300, 4096])
def test_default_config_lowers_for_the_gpu_at_model_widths(num_tokens):
    """What the GPU test above compiles, and T=4096 (the largest splits and column runs), lowered
    to Triton on any machine (tests/gpu_lowering.py); host- and jnp-built metadata."""
    prob = _model_width_problem(num_tokens, num_tokens)
    config = SgmvConfig()
    ts = jnp.asarray(prob.token_slot)
    for meta in (build_sgmv_metadata(prob.token_slot, 24, config=config), None):

        def step(x, y, ts, meta):
            v = sgmv_shrink(
                x,
                prob.a_pool,
                prob.a_pages,
                prob.ranks,
                ts,
                prob.layer,
                weights=prob.weights,
                kernel_meta=meta,
                config=config,
            )
            return sgmv_expand(
                y,
                v,
                prob.b_pools,
                prob.b_pages,
                prob.ranks,
                prob.scales,
                ts,
                prob.layer,
                weights=prob.weights,
                kernel_meta=meta,
                config=config,
            )

        text = lower_for_gpu(step, prob.x, prob.y, ts, meta)
        assert triton_kernels(text) == 2
        # Per token up to 2,048 token rows (T x 3 x 64 v columns): T = 1 only.
        regime = config.regime(num_tokens, "shrink", columns=3 * 64)
        assert regime == ("decode" if num_tokens == 1 else "prefill")
        assert f"sgmv_shrink_{regime}_" in text
        if regime == "prefill":
            # The K step by T: 64 for the few tiles of a decode batch, 256 for a prefill.
            bk = 64 if num_tokens <= config.shrink_small_tokens else 256
            assert f"sgmv_shrink_prefill_bt16_bn64_bk{bk}_" in text


# ------------------------------------------------------------------------------------------------
# sgmv_apply (the model's entry point: shrink then expand)
# ------------------------------------------------------------------------------------------------


def _group_case(tag, group, num_tokens, dtype):
    """A module group's problem, the test config (decode kernels up to T=16, prefill above), the
    host metadata its regime needs, and the arguments after x (and y) that sgmv_apply and
    sgmv_delta (and their references) share up to the token slots."""
    in_width, out_widths = GROUPS[group]
    prob = make_problem(
        zlib.crc32(f"{tag}-{group}-{num_tokens}-{jnp.dtype(dtype).name}".encode()),
        num_tokens=num_tokens,
        in_width=in_width,
        out_widths=out_widths,
        dtype=dtype,
    )
    config = dataclasses.replace(SMALL, decode_max_tokens=16)
    meta = (
        None
        if config.regime(num_tokens) == "decode"
        else build_sgmv_metadata(prob.token_slot, prob.ranks.shape[0], config=config)
    )
    pools = (prob.a_pool, prob.b_pools, prob.a_pages, prob.b_pages, prob.ranks, prob.scales)
    _poison_allocator(num_tokens * sum(out_widths) * 4)
    return prob, dict(weights=prob.weights, kernel_meta=meta, config=config), pools


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("num_tokens", [11, 40])
@pytest.mark.parametrize("group", list(GROUPS))
def test_sgmv_apply_matches_reference(group, num_tokens, interpret):
    """Both regimes (decode at T=11, prefill at T=40 with the test config), two launches each;
    base-only tokens left bit for bit."""
    prob, kw, pools = _group_case("apply", group, num_tokens, jnp.bfloat16)
    ts = jnp.asarray(prob.token_slot)

    def apply(x, y, token_slot, *, interpret):
        return sgmv_apply(x, y, *pools, token_slot, prob.layer, **kw, interpret=interpret)

    args = (prob.x, prob.y, ts)
    if interpret:  # the same call must also lower for the GPU, in two launches
        assert triton_kernels(lower_for_gpu(functools.partial(apply, interpret=False), *args)) == 2
    y = apply(*args, interpret=interpret)
    y_ref = sgmv_apply_reference(prob.x, prob.y, *pools, ts, prob.layer, weights=prob.weights)
    assert _rel_err(y, y_ref) < TOL["bfloat16"] and y.dtype == prob.y.dtype
    base_only = prob.token_slot < 0
    np.testing.assert_array_equal(np.asarray(y)[base_only], np.asarray(prob.y)[base_only])


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    "group, num_tokens, dtype_name",
    # every group, both regimes (decode at T=11, prefill at T=40) and both dtypes, in 4 runs
    [
        ("qkv", 11, "bfloat16"),
        ("gate_up", 40, "bfloat16"),
        ("down", 11, "float32"),
        ("qkv", 40, "float32"),
    ],
)
def test_sgmv_delta_matches_reference(group, num_tokens, dtype_name, interpret):
    """The delta form the model uses (both regimes): float32, every element written (the
    interpreter starts outputs as NaN, the GPU allocator is poisoned), exact zeros for base-only
    tokens and for weights an adapter does not target, and the same y as the in-place form once
    the model adds it."""
    prob, kw, pools = _group_case("delta", group, num_tokens, jnp.dtype(dtype_name))
    ts = jnp.asarray(prob.token_slot)

    def delta_fn(x, token_slot, *, interpret):
        return sgmv_delta(x, *pools, token_slot, prob.layer, **kw, interpret=interpret)

    if interpret:  # the same call must also lower for the GPU, in two launches
        lowered = lower_for_gpu(functools.partial(delta_fn, interpret=False), prob.x, ts)
        assert triton_kernels(lowered) == 2
    delta = delta_fn(prob.x, ts, interpret=interpret)
    delta_ref = sgmv_delta_reference(prob.x, *pools, ts, prob.layer, weights=prob.weights)
    out_widths = GROUPS[group][1]
    assert delta.dtype == jnp.float32 and delta.shape == (num_tokens, sum(out_widths))
    assert _rel_err(delta, delta_ref) < TOL[dtype_name]
    got = np.asarray(delta)
    np.testing.assert_array_equal(got[prob.token_slot < 0], 0.0)
    ranks = np.asarray(prob.ranks)
    lo = 0
    for g, width in enumerate(out_widths):
        untargeted = (prob.token_slot >= 0) & (
            ranks[np.maximum(prob.token_slot, 0), prob.weights[g]] == 0
        )
        np.testing.assert_array_equal(got[untargeted, lo : lo + width], 0.0)
        lo += width
    y_from_delta = (prob.y.astype(jnp.float32) + delta).astype(prob.y.dtype)
    y_in_place = sgmv_apply(prob.x, prob.y, *pools, ts, prob.layer, **kw, interpret=interpret)
    assert _rel_err(y_from_delta, y_in_place) < TOL[dtype_name]


# ------------------------------------------------------------------------------------------------
# bad input: clear errors naming the tensor and the expected shape
# ------------------------------------------------------------------------------------------------


def test_config_from_json_names_the_source_and_the_field():
    config = SgmvConfig.from_json('{"decode_max_tokens": 32}', where="--sgmv_config")
    assert config == SgmvConfig(decode_max_tokens=32)
    assert SgmvConfig.from_json("{}", where="--sgmv_config") == SgmvConfig()
    cases = [
        ("{bad", r"--sgmv_config: not valid JSON"),
        ("[1]", r"--sgmv_config: expected an object of SgmvConfig fields, got list"),
        ('{"decode_fused_max_tokens": 8}', r"unknown SgmvConfig field 'decode_fused_max_tokens'"),
        ('{"decode_block_k": 3}', r"--sgmv_config: .*'decode_block_k': expected a power of two"),
        ('{"decode_max_tokens": -1}', r"'decode_max_tokens': expected an int >= 0, got -1"),
    ]
    for text, message in cases:
        with pytest.raises(ConfigError, match=message):
            SgmvConfig.from_json(text, where="--sgmv_config")
    # serve.py / benchmark.py set `deterministic` from their own flag (RunnerConfig's): given in
    # the JSON too it would be overridden without a word, so it is refused there.
    elsewhere = {"deterministic": "--[no]deterministic"}
    with pytest.raises(
        ConfigError,
        match=r"--sgmv_config: SgmvConfig field 'deterministic' is set by --\[no\]deterministic",
    ):
        SgmvConfig.from_json(
            '{"deterministic": false}', where="--sgmv_config", set_elsewhere=elsewhere
        )
    assert SgmvConfig.from_json(
        '{"shrink_split_k": 2}', where="--sgmv_config", set_elsewhere=elsewhere
    ) == SgmvConfig(shrink_split_k=2)


def test_bad_inputs_raise_config_errors():
    prob = make_problem(1, num_tokens=20, in_width=40, out_widths=(56, 56))
    ts = jnp.asarray(prob.token_slot)
    args = (prob.a_pages, prob.ranks, ts, prob.layer)
    with pytest.raises(ConfigError, match=r"x must be \(T, 40\)"):
        sgmv_shrink(prob.x[:, :30], prob.a_pool, *args, weights=prob.weights, interpret=True)
    with pytest.raises(ConfigError, match="weights"):
        sgmv_shrink(prob.x, prob.a_pool, *args, weights=(7,), interpret=True)
    with pytest.raises(ConfigError, match="token_slot must be"):
        sgmv_shrink(
            prob.x,
            prob.a_pool,
            prob.a_pages,
            prob.ranks,
            ts[:5],
            prob.layer,
            weights=prob.weights,
            interpret=True,
        )
    meta = build_sgmv_metadata(prob.token_slot, 6, config=SgmvConfig(shrink_block_tokens=16))
    with pytest.raises(ConfigError, match=r"kernel_meta\['shrink_tile_start'\] must have shape"):
        sgmv_shrink(
            prob.x,
            prob.a_pool,
            *args,
            weights=prob.weights,
            kernel_meta=meta,
            config=SgmvConfig(
                shrink_block_tokens=64, decode_max_tokens=0, decode_shrink_max_tokens=None
            ),
            interpret=True,
        )
    v = jnp.zeros((20, 2, 12), jnp.float32)
    with pytest.raises(ConfigError, match=r"y must be \(T, 112\)"):
        sgmv_expand(
            prob.y[:, :100],
            v,
            prob.b_pools,
            prob.b_pages,
            prob.ranks,
            prob.scales,
            ts,
            prob.layer,
            weights=prob.weights,
            interpret=True,
        )
    with pytest.raises(ConfigError, match=r"v must be \(T, G, MP\*R\)"):
        sgmv_expand(
            prob.y,
            v[:, :1],
            prob.b_pools,
            prob.b_pages,
            prob.ranks,
            prob.scales,
            ts,
            prob.layer,
            weights=prob.weights,
            interpret=True,
        )
    with pytest.raises(ConfigError, match="one pool per weight"):
        sgmv_expand(
            prob.y,
            v,
            prob.b_pools[:1],
            prob.b_pages,
            prob.ranks,
            prob.scales,
            ts,
            prob.layer,
            weights=prob.weights,
            interpret=True,
        )
    # Each bad SgmvConfig field, and the message that must name it (as in test_lora_matmul).
    for fields, message in (
        ({"expand_block_tokens": 24}, "expand_block_tokens"),
        ({"decode_shrink_rows": 3}, "decode_shrink_rows"),
        ({"shrink_block_k": 8}, "shrink_block_k"),
        ({"shrink_small_tokens": -1}, "shrink_small_tokens"),
        ({"deterministic": 1}, "'deterministic': expected a bool, got 1"),
        ({"expand_prefetch_y": 1}, "'expand_prefetch_y': expected a bool, got 1"),
        (
            {"decode_shrink_max_token_rows": -1},
            "'decode_shrink_max_token_rows': expected None or an int >= 0, got -1",
        ),
        ({"shrink_large_waves": 0}, "'shrink_large_waves': expected an int >= 1, got 0"),
        ({"shrink_large_tokens": 2.5}, "'shrink_large_tokens': expected an int >= 0, got 2.5"),
        ({"per_token_max_rows": -1}, "'per_token_max_rows': expected None or an int >= 0"),
        ({"per_token_block_k": 100}, "'per_token_block_k': expected a power of two"),
        ({"per_token_expand_num_stages": 0}, "'per_token_expand_num_stages': expected an int"),
    ):
        with pytest.raises(ConfigError, match=message):
            SgmvConfig(**fields)
    assert [SgmvConfig().shrink_k_step(t) for t in (65, 128, 129)] == [64, 64, 256]
    assert SgmvConfig(shrink_block_k=128).shrink_k_step(65) == 128

"""The fused decode projection (base GEMM + LoRA expand epilogue) against its jnp reference.

CPU: interpret mode, and the Triton lowering for an abstract H100 (tests/gpu_lowering.py). The
same cases run compiled on a GPU (marked ``gpu``). The LoRA operands come from the SGMV tests'
problem builder: NaN wherever no adapter's rank-row lives, shuffled page ids, ranks that are not
multiples of any block, shuffled tokens with base-only tokens; v carries NaN beyond each rank.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import lower_for_gpu, triton_kernels
from jax.experimental import pallas as pl
from test_sgmv import INTERPRET, TOL, _rel_err, make_problem

from jaxlora.errors import ConfigError
from pallas_kernels.lora_matmul import (
    _NO_MORE,
    LoraExpand,
    LoraShrink,
    MatmulConfig,
    _block_adapters,
    build_shrink_rows,
    lora_matmul,
    lora_matmul_reference,
    lora_projection,
)
from pallas_kernels.sgmv import SgmvConfig, sgmv_shrink_reference

# Small blocks: several column blocks per weight, several token blocks, partial K steps.
SMALL = MatmulConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)

# The eighth session's epilogue (one rank row of every token per step, on the CUDA cores).
ROWS = MatmulConfig(epilogue="rows")

# (in width, out widths of the group): q|k|v with GQA widths, gate|up, down (K not a multiple
# of the K step).
GROUPS = {"qkv": (40, (32, 16, 16)), "gate_up": (48, (48, 48)), "down": (72, (32,))}


def _case(group, num_tokens, dtype, *, num_layers=3, adapters=None, rows_per_page=4):
    """The problem, its stacked base kernels and LoRA operands; ``adapters``: the slots the
    tokens with an adapter draw from (default: all of the problem's); ranks up to 3 pages."""
    in_width, out_widths = GROUPS[group]
    tag = f"{group}-{num_tokens}-{jnp.dtype(dtype).name}"
    prob = make_problem(
        zlib.crc32(tag.encode()),
        num_tokens=num_tokens,
        in_width=in_width,
        out_widths=out_widths,
        num_layers=num_layers,
        dtype=dtype,
        rows_per_page=rows_per_page,
    )
    rng = np.random.default_rng(zlib.crc32(tag.encode()) + 1)
    if adapters is not None:
        drawn = rng.choice(np.asarray(adapters, np.int32), num_tokens)
        token_slot = np.where(prob.token_slot >= 0, drawn, -1).astype(np.int32)
        prob = dataclasses.replace(prob, token_slot=token_slot)
    w = jnp.asarray(
        rng.standard_normal((num_layers, in_width, sum(out_widths))) / np.sqrt(in_width), dtype
    )
    token_slot = jnp.asarray(prob.token_slot)
    v = sgmv_shrink_reference(
        prob.x, prob.a_pool, prob.a_pages, prob.ranks, token_slot, prob.layer, weights=prob.weights
    )
    # Entries of v beyond each weight's rank are never read: make them NaN.
    slot = np.maximum(prob.token_slot, 0)
    ranks = np.asarray(prob.ranks)[slot][:, list(prob.weights)]  # (T, G)
    ranks[prob.token_slot < 0] = 0
    beyond = np.arange(v.shape[2])[None, None, :] >= ranks[:, :, None]
    v = jnp.where(jnp.asarray(beyond), jnp.nan, v)
    return prob, w, _expand(prob, v)


def _expand(prob, v):
    """The LoRA operands of the SGMV tests' problem, with shrink output v."""
    return LoraExpand(
        v=v,
        b_pools=prob.b_pools,
        b_pages=prob.b_pages,
        ranks=prob.ranks,
        scales=prob.scales,
        token_slot=jnp.asarray(prob.token_slot),
        weights=prob.weights,
    )


def _reference_with_finite_v(prob, w, lora):
    v = jnp.nan_to_num(lora.v, nan=0.0)
    finite = dataclasses.replace(lora, v=v)
    return lora_matmul_reference(prob.x, w, prob.layer, lora=finite)


# Every epilogue; the rows epilogues (the eighth session's, and the same software-pipelined) at
# T=40 only.
CASES = [
    (num_tokens, group, dtype_name, epilogue)
    for epilogue in ("dot", "rows", "rows_prefetch")
    for num_tokens in (1, 40)
    for group in GROUPS
    for dtype_name in ("float32", "bfloat16")
    if epilogue == "dot" or num_tokens == 40
]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(("num_tokens", "group", "dtype_name", "epilogue"), CASES)
def test_lora_matmul_matches_reference(num_tokens, group, dtype_name, epilogue, interpret):
    """The dot epilogue's steps here cover 4 tokens x 8 rank rows (ranks up to 12: two rank
    chunks, the second skipped where no token of the block has that rank; 4 token chunks per
    block of 16) and T=40 gives row blocks of 16, 16 and 8 tokens. At T=1 both rank chunks'
    indices are computed before the K loop; at T=40 the second chunk's inside its step."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, num_tokens, dtype)
    y_ref = _reference_with_finite_v(prob, w, lora)
    config = dataclasses.replace(
        SMALL,
        epilogue=epilogue,
        epilogue_rank_rows=8,
        epilogue_block_k=32,
        epilogue_prepared_rank_rows=16 if num_tokens == 1 else 8,
    )
    run = jax.jit(
        lambda x, w, layer, lora: lora_matmul(
            x, w, layer, lora=lora, config=config, interpret=interpret
        )
    )
    y = run(prob.x, w, prob.layer, lora)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert _rel_err(y, y_ref) < TOL[dtype_name]
    # Base only: the same kernel without the epilogue.
    base = lora_matmul(prob.x, w, prob.layer, config=SMALL, interpret=interpret)
    assert _rel_err(base, lora_matmul_reference(prob.x, w, prob.layer)) < TOL[dtype_name]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("group", "dtype_name", "epilogue"),
    [("qkv", "bfloat16", "dot"), ("gate_up", "float32", "dot"), ("down", "float32", "rows")],
)
def test_sub_blocks_share_the_weight_tile(group, dtype_name, epilogue, interpret):
    """Row blocks of 32 tokens as two dots of 16 per K step (dot_block_m), each sub-block with
    its own epilogue: at T=40 the second program's second sub-block has no token at all. Same
    results as the reference; without LoRA the kernel keeps whole-block dots."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 40, dtype)
    config = dataclasses.replace(
        SMALL,
        block_m=32,
        dot_block_m=16,
        epilogue=epilogue,
        epilogue_rank_rows=8,
        epilogue_block_k=32,
        epilogue_prepared_rank_rows=8,
    )
    y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret)
    assert _rel_err(y, _reference_with_finite_v(prob, w, lora)) < TOL[dtype_name]
    base = lora_matmul(prob.x, w, prob.layer, config=config, interpret=interpret)
    assert _rel_err(base, lora_matmul_reference(prob.x, w, prob.layer)) < TOL[dtype_name]


def _epilogue_config(split_k, epilogue, **fields):
    """SMALL with that split and epilogue, 8 rank rows a dot step (K 32, 8 prepared), and
    ``fields``."""
    return dataclasses.replace(
        SMALL,
        split_k=split_k,
        epilogue=epilogue,
        epilogue_rank_rows=8,
        epilogue_block_k=32,
        epilogue_prepared_rank_rows=8,
        **fields,
    )


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("group", "dtype_name", "epilogue", "split_k"),
    [
        ("qkv", "bfloat16", "dot", 2),
        ("gate_up", "float32", "dot", 4),
        ("down", "float32", "rows", 4),
        ("down", "bfloat16", "rows_prefetch", 2),
        ("qkv", "float32", "rows", 3),
    ],
)
def test_split_k_partials_sum_to_the_reference(group, dtype_name, epilogue, split_k, interpret):
    """K split over programs (float32 partials the wrapper sums), the LoRA terms shared out:
    rank rows (rows epilogues) or steps (dot) i go to part i % split. K = 40 / 48 / 72 in steps
    of 16 (3, 3 and 5 steps): split 2 of q|k|v overruns K in its last step; split 4 of gate|up
    is capped at its 3 steps; split 4 of down leaves the last part past K (masked, zeros)."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 40, dtype)
    config = _epilogue_config(split_k, epilogue)
    y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret)
    assert y.shape == (40, w.shape[2]) and y.dtype == dtype
    assert _rel_err(y, _reference_with_finite_v(prob, w, lora)) < TOL[dtype_name]
    base = lora_matmul(prob.x, w, prob.layer, config=config, interpret=interpret)
    assert _rel_err(base, lora_matmul_reference(prob.x, w, prob.layer)) < TOL[dtype_name]
    # partials=True: the same partials unsummed (pallas_kernels.residual_norm sums them); their
    # sum rounded once is the output, bit for bit. Without a split: the output as one part.
    parts = lora_matmul(
        prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret, partials=True
    )
    assert parts.shape == (min(split_k, 5 if group == "down" else 3), 40, w.shape[2])
    assert parts.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(parts.sum(axis=0).astype(dtype)), np.asarray(y))
    whole = dataclasses.replace(config, split_k=1)
    one = lora_matmul(prob.x, w, prob.layer, config=whole, interpret=interpret, partials=True)
    assert one.shape == (1, 40, w.shape[2]) and one.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(one[0]),
        np.asarray(lora_matmul(prob.x, w, prob.layer, config=whole, interpret=interpret)),
    )


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("dtype_name", "epilogue", "split_k", "num_tokens"),
    [
        ("float32", "dot", 1, 40),
        ("bfloat16", "dot", 1, 1),
        ("bfloat16", "rows", 1, 40),
        ("float32", "dot", 2, 40),  # the split's partials: the bias goes to their sum
    ],
)
def test_bias_is_added_before_the_one_rounding(
    dtype_name, epilogue, split_k, num_tokens, interpret
):
    """bias (Qwen2's q|k|v): the layer's bias row added to every token's output, LoRA tokens
    and base-only ones, in the epilogue before the one rounding (in the partials' sum with a K
    split); a different bias per layer, so that the layer index is read."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case("qkv", num_tokens, dtype)
    rng = np.random.default_rng(7)
    bias = jnp.asarray(rng.standard_normal((w.shape[0], w.shape[2])), dtype)
    config = dataclasses.replace(SMALL, split_k=split_k, epilogue=epilogue)
    for with_lora in (lora, None):
        y = lora_matmul(
            prob.x, w, prob.layer, lora=with_lora, bias=bias, config=config, interpret=interpret
        )
        plain = lora_matmul(
            prob.x, w, prob.layer, lora=with_lora, config=config, interpret=interpret
        )
        finite = (
            None
            if with_lora is None
            else dataclasses.replace(lora, v=jnp.nan_to_num(lora.v, nan=0.0))
        )
        want = lora_matmul_reference(prob.x, w, prob.layer, lora=finite, bias=bias)
        assert y.dtype == dtype and _rel_err(y, want) < TOL[dtype_name]
        moved = np.abs(np.asarray(y, np.float32) - np.asarray(plain, np.float32)).max()
        assert moved > 0.1
    name = str(
        jax.make_jaxpr(
            lambda *a: lora_matmul(*a, lora=lora, bias=bias, config=config, interpret=interpret)
        )(prob.x, w, prob.layer)
    )
    assert ("_bias_" in name) == (split_k == 1)
    with pytest.raises(ConfigError, match=r"bias must be \(L, N\)"):
        lora_matmul(prob.x, w, prob.layer, bias=bias[0], config=config, interpret=interpret)
    with pytest.raises(ConfigError, match="come without partials"):
        lora_matmul(prob.x, w, prob.layer, bias=bias, partials=True, interpret=interpret)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("group", "dtype_name", "epilogue", "split_k", "adapters"),
    [
        ("qkv", "bfloat16", "dot", None, (0,)),
        ("gate_up", "float32", "rows", None, (0, 5)),
        ("down", "float32", "dot", 4, (5, 2, 0)),
        ("qkv", "float32", "rows", 2, (1, 2, 3, 4, 5)),
    ],
)
def test_blocks_with_few_adapters(group, dtype_name, epilogue, split_k, adapters, interpret):
    """Blocks whose tokens use at most 3 adapters (epilogue_adapters=3) add each adapter's delta
    as whole-block dots of 16 rank rows (two chunks for ranks up to 24, the second skipped up to
    rank 16); blocks with more keep the dot or rows epilogue. One adapter, two, three (shared
    out among 4 K parts) and five (blocks of 16 with more than 3, the last block of 8 maybe
    not; the reference-matching tests above mix both paths with the dot epilogue). Same result
    as the reference and as the general epilogue alone."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 40, dtype, adapters=adapters, rows_per_page=8)
    config = _epilogue_config(split_k, epilogue, epilogue_adapters=3, adapter_rank_rows=16)
    y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret)
    assert y.shape == (40, w.shape[2]) and y.dtype == dtype
    assert _rel_err(y, _reference_with_finite_v(prob, w, lora)) < TOL[dtype_name]
    general = dataclasses.replace(config, epilogue_adapters=0)
    y_general = lora_matmul(prob.x, w, prob.layer, lora=lora, config=general, interpret=interpret)
    assert _rel_err(y, y_general) < TOL[dtype_name]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(("group", "dtype_name"), [("gate_up", "float32"), ("qkv", "bfloat16")])
def test_wide_blocks_list_more_adapters(group, dtype_name, interpret):
    """Blocks of at least wide_epilogue_min_tokens tokens take the few-adapters epilogue with up
    to wide_epilogue_adapters adapters: 70 tokens over 5 adapters in blocks of 64 (the default
    epilogue there: the pipelined rows) and of 16 (the dot epilogue, 3 adapters at most). Every
    variant gives the reference's result, and the general epilogues' alone."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 70, dtype, adapters=(0, 1, 2, 3, 5), rows_per_page=8)
    wide = MatmulConfig(
        block_m=64,
        block_n=16,
        block_k=16,
        num_stages=2,
        epilogue_adapters=3,
        wide_epilogue_adapters=6,
        adapter_rank_rows=16,
    )
    assert wide.epilogue_for(64) == "rows_prefetch" and wide.epilogue_adapters_for(64) == 6
    assert wide.epilogue_for(16) == "dot" and wide.epilogue_adapters_for(16) == 3
    reference = _reference_with_finite_v(prob, w, lora)
    results = {}
    for name, config in (
        ("wide", wide),
        ("narrow", dataclasses.replace(wide, wide_epilogue_adapters=0)),
        ("general", dataclasses.replace(wide, epilogue_adapters=0)),
        ("blocks of 16", dataclasses.replace(wide, block_m=16, epilogue_rank_rows=8)),
    ):
        y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret)
        assert y.shape == (70, w.shape[2]) and y.dtype == dtype
        assert _rel_err(y, reference) < TOL[dtype_name], name
        results[name] = y
    assert _rel_err(results["wide"], results["general"]) < TOL[dtype_name]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("group", "dtype_name", "epilogue", "split_k", "adapters"),
    [
        ("qkv", "bfloat16", "dot", None, None),
        ("gate_up", "float32", "dot", None, (0, 5)),  # the few-adapters epilogue
        ("down", "float32", "dot", 4, None),  # the last part wholly past K
        ("qkv", "float32", "rows", 2, None),
        ("down", "bfloat16", "rows_prefetch", None, (1, 2, 3, 4, 5)),
    ],
)
def test_lora_terms_before_or_after_the_k_loop(
    group, dtype_name, epilogue, split_k, adapters, interpret
):
    """MatmulConfig.lora_first: the LoRA terms start the accumulator before the K loop (the
    default with the dot epilogue) or join it after (the default with the rows epilogues): the
    reference's result either way, and each other's within the dtype's rounding (only the order
    of the float32 sums differs). v is NaN beyond every rank, so a term read past one shows;
    tokens without an adapter get the base output alone."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 40, dtype, adapters=adapters, rows_per_page=8)
    config = _epilogue_config(
        split_k, epilogue, epilogue_adapters=3 if adapters else 0, adapter_rank_rows=16
    )
    assert config.lora_first_for(16) == (epilogue == "dot")
    reference = _reference_with_finite_v(prob, w, lora)
    base = np.asarray(lora_matmul(prob.x, w, prob.layer, config=config, interpret=interpret))
    no_adapter = np.asarray(prob.token_slot) < 0
    results = {}
    for first in (True, False):
        placed = dataclasses.replace(config, lora_first=first)
        y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=placed, interpret=interpret)
        assert y.shape == (40, w.shape[2]) and y.dtype == dtype, first
        assert np.isfinite(np.asarray(y, np.float32)).all(), first
        assert _rel_err(y, reference) < TOL[dtype_name], first
        np.testing.assert_array_equal(np.asarray(y)[no_adapter], base[no_adapter])
        name = str(
            jax.make_jaxpr(
                lambda *a, placed=placed: lora_matmul(
                    *a, lora=lora, config=placed, interpret=interpret
                )
            )(prob.x, w, prob.layer)
        )
        assert ("_first_" in name) == first
        results[first] = y
    assert _rel_err(results[True], results[False]) < TOL[dtype_name]


@pytest.mark.parametrize("interpret", INTERPRET)
def test_large_blocks_run_their_own_warps(interpret):
    """MatmulConfig.large_block_num_warps: programs of at least large_block_elements outputs
    (here 64 x 32 of a 40-token step) run with 8 warps, base only and with the expand
    epilogue: the reference's result, and the same as with 4 warps."""
    prob, w, lora = _case("gate_up", 40, jnp.float32)
    four = MatmulConfig(block_m=64, block_n=32, block_k=16, num_stages=2)
    eight = dataclasses.replace(four, large_block_num_warps=8, large_block_elements=64 * 32)
    assert eight.num_warps_for(64, 32) == 8 and eight.num_warps_for(64, 16) == 4
    assert four.num_warps_for(64, 32) == 4
    reference = _reference_with_finite_v(prob, w, lora)
    for with_lora in (True, False):
        kwargs = {"lora": lora} if with_lora else {}
        want = reference if with_lora else lora_matmul_reference(prob.x, w, prob.layer)
        y8 = lora_matmul(prob.x, w, prob.layer, config=eight, interpret=interpret, **kwargs)
        y4 = lora_matmul(prob.x, w, prob.layer, config=four, interpret=interpret, **kwargs)
        assert _rel_err(y8, want) < TOL["float32"]
        assert _rel_err(y8, y4) < TOL["float32"]


@pytest.mark.parametrize("interpret", INTERPRET)
def test_min_block_m_pads_a_small_step_with_masked_rows(interpret):
    """MatmulConfig.min_block_m: 13 tokens in a block of 32 (19 masked rows, never loaded or
    stored), base only and with the expand epilogue: the reference's result."""
    prob, w, lora = _case("gate_up", 13, jnp.float32)
    config = dataclasses.replace(SMALL, min_block_m=32)
    assert config.block_m_for(13) == 32 and SMALL.block_m_for(13) == 16
    y = lora_matmul(prob.x, w, prob.layer, lora=lora, config=config, interpret=interpret)
    assert _rel_err(y, _reference_with_finite_v(prob, w, lora)) < TOL["float32"]
    base = lora_matmul(prob.x, w, prob.layer, config=config, interpret=interpret)
    assert _rel_err(base, lora_matmul_reference(prob.x, w, prob.layer)) < TOL["float32"]


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize(
    ("group", "dtype_name", "split_k", "adapters", "listed", "num_rows"),
    [
        ("qkv", "bfloat16", None, (0,), (0,), 16),
        ("gate_up", "float32", None, (0, 5), (5, 0), 32),
        ("down", "float32", 4, (5, 2), (2, 5), 32),
        ("qkv", "float32", 2, (1, 2, 3), (1, 2), 32),
    ],
)
def test_shrink_in_the_k_loop(group, dtype_name, split_k, adapters, listed, num_rows, interpret):
    """A step with few adapters runs the shrink in lora_matmul's own K loop: one more dot a K
    step by the listed A rank rows (build_shrink_rows: every rank row of each listed slot, then
    unused rows), and one epilogue dot by their B rows. Ranks up to 12 over pages of 4 rows
    (shuffled); with a K split each part adds its partial v's delta. Tokens of a slot that is
    not listed (slot 3 in the last case) get the base output alone; a row naming a slot past
    the tables lists nothing. Same result as the
    reference and, where every slot is listed, as the shrink kernel then the expand epilogue."""
    dtype = jnp.dtype(dtype_name)
    prob, w, lora = _case(group, 40, dtype, adapters=adapters)
    rows = build_shrink_rows(np.asarray(prob.ranks), listed, num_rows)
    assert rows is not None and rows[0, -1] == -1
    rows[:, -1] = (prob.ranks.shape[0], 0)  # a slot outside the tables: lists nothing
    fused = dataclasses.replace(
        lora,
        v=None,
        shrink=LoraShrink(a_pool=prob.a_pool, a_pages=prob.a_pages, rows=jnp.asarray(rows)),
    )
    config = dataclasses.replace(SMALL, split_k=split_k)
    y = lora_matmul(prob.x, w, prob.layer, lora=fused, config=config, interpret=interpret)
    assert y.shape == (40, w.shape[2]) and y.dtype == dtype
    y_ref = lora_matmul_reference(prob.x, w, prob.layer, lora=fused)
    assert _rel_err(y, y_ref) < TOL[dtype_name]
    token_slot = np.asarray(prob.token_slot)
    unlisted = (token_slot >= 0) & ~np.isin(token_slot, listed)
    if unlisted.any():
        base = lora_matmul_reference(prob.x, w, prob.layer)
        np.testing.assert_allclose(
            np.asarray(y)[unlisted], np.asarray(base)[unlisted], rtol=2e-5, atol=1e-5
        )
    else:
        y_two_launches = _reference_with_finite_v(prob, w, lora)
        assert _rel_err(y, y_two_launches) < TOL[dtype_name]


def test_build_shrink_rows_lists_every_rank_row_of_each_slot():
    """Each slot's largest rank over the 7 weights, in the order given, then unused rows; None
    when they do not fit."""
    ranks = np.zeros((4, 7), np.int32)
    ranks[0, :] = 3
    ranks[2, :4] = 2
    ranks[2, 6] = 5
    rows = build_shrink_rows(ranks, [2, 0], 16)
    assert rows.dtype == np.int32 and rows.shape == (2, 16)
    assert rows[0].tolist() == [2] * 5 + [0] * 3 + [-1] * 8
    assert rows[1, :8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert build_shrink_rows(ranks, [2, 0, 0, 0], 16) is not None  # 14 rows
    assert build_shrink_rows(ranks, [2, 0, 0, 0, 0], 16) is None  # 17 rows
    assert (build_shrink_rows(ranks, [], 16)[0] == -1).all()


@pytest.mark.parametrize(
    ("slots", "count", "expected", "every"),
    [
        ([3, -1, 3, 3], 2, [3, _NO_MORE], True),
        ([5, 1, -1, 5, 1, 9], 3, [1, 5, 9], True),
        ([5, 1, -1, 5, 1, 9, 0], 3, [0, 1, 5], False),
        ([-1, -1, -1], 2, [_NO_MORE, _NO_MORE], True),
        ([7, 2, 7, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2, 7], 1, [2], False),
    ],
)
def test_block_adapters_lists_a_blocks_slots_in_order(slots, count, expected, every):
    """The few-adapters test of a block (its first ``count`` slots ascending, ``_NO_MORE`` past
    the last, and whether that was all of them), in a kernel of one block of 32 token slots;
    the rows past the slots' end are masked (their loads give -1)."""
    num_tokens = len(slots)

    def kernel(slot_ref, out_ref, every_ref):
        rows = jnp.arange(32, dtype=jnp.int32)
        row_ok = rows < num_tokens
        rows_i = jnp.where(row_ok, rows, num_tokens)
        found = _block_adapters(slot_ref, rows_i, row_ok, count)
        out_ref[...] = jnp.stack(found.adapters)
        every_ref[...] = jnp.full((1,), found.every, jnp.int32)

    found, all_found = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((count,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        interpret=True,
    )(jnp.asarray(slots, jnp.int32))
    assert found.tolist() == expected
    assert bool(all_found[0]) is every


@pytest.mark.parametrize("interpret", INTERPRET)
def test_every_layer_and_base_only_tokens(interpret):
    """The layer is read in place from the stacked kernels (and the pools) at a traced index;
    tokens without an adapter get exactly the base output. Every dot-epilogue step computes its
    indices after the K loop here (none prepared)."""
    prob, w, lora = _case("qkv", 24, jnp.float32, num_layers=4)
    config = dataclasses.replace(SMALL, epilogue_prepared_rank_rows=0)
    run = jax.jit(
        lambda x, layer, lora: lora_matmul(
            x, w, layer, lora=lora, config=config, interpret=interpret
        )
    )
    for layer in range(4):
        y = run(prob.x, jnp.int32(layer), lora)
        ref = lora_matmul_reference(
            prob.x, w, layer, lora=dataclasses.replace(lora, v=jnp.nan_to_num(lora.v))
        )
        assert _rel_err(y, ref) < TOL["float32"]
        base = lora_matmul_reference(prob.x, w, layer)
        none = prob.token_slot < 0
        assert none.any()
        np.testing.assert_allclose(
            np.asarray(y)[none], np.asarray(base)[none], rtol=2e-5, atol=1e-5
        )


def test_a_biased_projection_lowers_for_the_gpu():
    """The bias epilogue (its layer-stacked operand read at the traced layer) lowers to Triton:
    one launch, Qwen2.5-7B's q|k|v widths (3,584 -> 3,584 + 2 x 512), batch 32, unsplit. (The
    default config splits this K; the bias then goes to the partials' sum.)"""
    x = jnp.zeros((32, 3584), jnp.bfloat16)
    w = jnp.zeros((2, 3584, 4608), jnp.bfloat16)
    bias = jnp.zeros((2, 4608), jnp.bfloat16)

    def project(x, w, bias, layer, split_k):
        config = MatmulConfig(split_k=split_k)
        return lora_matmul(x, w, layer, bias=bias, config=config)

    for split_k, tag in ((1, "_bias_"), (None, "_sk")):
        fn = functools.partial(project, split_k=split_k)
        text = lower_for_gpu(fn, x, w, bias, jnp.int32(1))
        assert triton_kernels(text) == 1 and tag in text


def test_default_config_lowers_for_the_gpu_at_model_widths():
    """The 7B decode shapes (q|k|v 4096 + 1024 + 1024 columns here, bf16, T=8, 64 and 128)
    lowered to Triton on any machine: one kernel per call, named after its blocks."""
    in_width, widths = 512, (512, 128, 128)

    def lower(config, *, with_lora=True):
        """The Triton IR of one lora_matmul call on this T's problem."""
        if not with_lora:
            return lower_for_gpu(lambda x, w: lora_matmul(x, w, 1, config=config), prob.x, w)
        return lower_for_gpu(
            lambda x, w, lora, layer: lora_matmul(x, w, layer, lora=lora, config=config),
            prob.x,
            w,
            lora,
            prob.layer,
        )

    for num_tokens in (8, 64, 128):
        prob = make_problem(
            num_tokens,
            num_tokens=num_tokens,
            in_width=in_width,
            out_widths=widths,
            rows_per_page=16,
            max_pages=4,
            num_slots=24,
            dtype=jnp.bfloat16,
        )
        w = jnp.zeros((2, in_width, sum(widths)), jnp.bfloat16)
        lora = _expand(prob, jnp.zeros((num_tokens, 3, 64), jnp.float32))
        bm = max(16, min(128, num_tokens))
        # N = 768: too few columns for 160 blocks, so 64 a block and a K split: 4 K steps of
        # 128 up to 32 tokens, 8 of 64 above, all split (12 column blocks, under 160 programs).
        bn = 64
        bk = 128 if num_tokens <= 32 else 64
        split = f"_sk{512 // bk}"
        blocks = f"bm{bm}_bn{bn}_bk{bk}_w4_s4"
        # The dot epilogue up to 32 tokens (16 tokens x 16 rank rows a step), its terms before
        # the K loop; the pipelined rows epilogue up to 64, rows above, theirs after it; each
        # forced the other way; beside the few-adapters epilogue (4 adapters a block, 8 from
        # 64 tokens) and without it; base only.
        dot = num_tokens <= 32
        adapters = "a4" if num_tokens < 64 else "a8"
        first = "_first" if dot else ""
        default = {8: "expand_r16k256p64", 64: "expand_prefetch", 128: "expand"}[num_tokens]
        cases = [
            (None, f"lora_matmul_{default}_{adapters}{first}"),
            (
                ROWS if dot else dataclasses.replace(ROWS, epilogue="dot"),
                f"lora_matmul_expand_{adapters}"
                if dot
                else f"lora_matmul_expand_r16k256p64_{adapters}_first",
            ),
            (MatmulConfig(epilogue_adapters=0), f"lora_matmul_{default}{first}"),
            (MatmulConfig(wide_epilogue_adapters=0), f"lora_matmul_{default}_a4{first}"),
            (MatmulConfig(lora_first=False), f"lora_matmul_{default}_{adapters}"),
            (MatmulConfig(lora_first=True), f"lora_matmul_{default}_{adapters}_first"),
        ]
        for config, name in cases:
            text = lower(config)
            assert triton_kernels(text) == 1 and f"{name}{split}_{blocks}" in text
        text = lower(None, with_lora=False)
        assert triton_kernels(text) == 1 and f"lora_matmul{split}_{blocks}" in text
        # The shrink in the K loop (a step with few adapters: 64 rank rows).
        rows = jnp.asarray(build_shrink_rows(np.asarray(prob.ranks), [0], 64))
        shrink = LoraShrink(a_pool=prob.a_pool, a_pages=prob.a_pages, rows=rows)
        fused = dataclasses.replace(lora, v=None, shrink=shrink)
        text = lower_for_gpu(
            lambda x, w, lora, layer: lora_matmul(x, w, layer, lora=lora),
            prob.x,
            w,
            fused,
            prob.layer,
        )
        assert triton_kernels(text) == 1 and f"lora_matmul_shrink64{split}_{blocks}" in text
        # Without the split, and the earlier column rule (32 columns below 128 blocks of 64).
        unsplit = MatmulConfig(min_programs=0, max_block_n=64, narrow_block_n=32)
        text = lower(unsplit, with_lora=False)
        assert triton_kernels(text) == 1 and f"lora_matmul_bm{bm}_bn32_bk{2 * bk}_" in text
    # T=128 as 8 sub-blocks of 16 tokens, each with the dot epilogue; the software-pipelined
    # rows epilogue; explicit splits.
    for config, name in (
        (MatmulConfig(dot_block_m=16), "lora_matmul_expand_r16k256p64_a4_first_d16_sk8_"),
        (MatmulConfig(epilogue="rows_prefetch"), "lora_matmul_expand_prefetch_a8_sk8_"),
        (MatmulConfig(prefetch_epilogue_max_tokens=128), "lora_matmul_expand_prefetch_a8_sk8_"),
        (MatmulConfig(split_k=2), "lora_matmul_expand_a8_sk2_"),
        (
            MatmulConfig(
                split_k=2, epilogue="rows_prefetch", epilogue_adapters=2, wide_epilogue_adapters=0
            ),
            "lora_matmul_expand_prefetch_a2_sk2_",
        ),
        (
            MatmulConfig(split_k=2, epilogue="dot"),
            "lora_matmul_expand_r16k256p64_a8_first_sk2_",
        ),
    ):
        text = lower(config)
        assert triton_kernels(text) == 1 and f"{name}{blocks}" in text


def test_default_blocks_follow_the_sweep():
    """The widest column block up to 128 with at least 160 blocks, else 64: q|k|v 64, gate|up
    128, o and down 64 (llama-2-7b), split along K up to 160 programs; the K step keeps the
    weight tile at 8192 elements up to 32 tokens, 4096 above; widths force smaller blocks."""
    config = MatmulConfig()
    for widths, bn in (
        ((4096,) * 3, 64),
        ((11008, 11008), 128),
        ((14336, 14336), 128),
        ((4096,), 64),
        ((11008,), 64),
        ((4096, 1024, 1024), 64),
    ):
        assert config.block_n_for(widths) == bn
    # o and down: 64 column blocks, split 4 (256 programs); q|k|v (192) and gate|up (172)
    # unsplit; the rows epilogue may ask for more programs.
    assert [config.split_k_for(p, 64) for p in (64, 192, 172)] == [4, 1, 1]
    rows = MatmulConfig(rows_epilogue_min_programs=384)
    assert rows.split_k_for(192, 64) == 1 and rows.split_k_for(192, 64, rows_epilogue=True) == 2
    # Partials' traffic capped at 0.3 of the weight bytes: o (33.5 MB) at T = 128 gets 2 parts
    # (8.4 MB of partials), at T = 32 still 4; down (90 MB) 4 at T = 128.
    capped = MatmulConfig(max_partial_share=0.3)
    for tokens, weights, parts in ((128, 4096, 2), (32, 4096, 4), (128, 11008, 4)):
        split = capped.split_k_for(
            64, 64, partial_bytes=8 * tokens * 4096, weight_bytes=weights * 4096 * 2
        )
        assert split == parts, (tokens, weights)
    assert MatmulConfig.from_json('{"max_partial_share": 0.3}', where="test") == capped
    # The earlier rule: 64 columns from 8192 on, 32 below, no split.
    earlier = MatmulConfig(max_block_n=64, narrow_block_n=32, column_programs=128, min_programs=0)
    for widths, bn in (((4096,) * 3, 64), ((11008, 11008), 64), ((4096,), 32), ((768,), 32)):
        assert earlier.block_n_for(widths) == bn
    assert earlier.split_k_for(128, 43) == 1
    assert [config.block_k_for(t, 64) for t in (1, 32, 33, 128)] == [128, 128, 64, 64]
    assert [config.block_k_for(t, 32) for t in (8, 128)] == [256, 128]
    assert config.block_n_for((8192, 8208)) == 16  # 8208 = 16 x 513
    assert config.block_n_for((8192, 8196)) == 0
    assert MatmulConfig(block_n=128, block_k=32).block_n_for((4096,)) == 128
    assert MatmulConfig(block_n=128, block_k=32).block_k_for(8, 128) == 32
    # Row blocks: the expand's own size where set, never above the (power-of-two) tokens.
    assert [config.block_m_for(t) for t in (1, 20, 128)] == [16, 32, 128]
    split = MatmulConfig(expand_block_m=32)
    assert [split.block_m_for(128), split.block_m_for(128, expand=True)] == [128, 32]
    assert split.block_m_for(20, expand=True) == 32 and split.block_m_for(8, expand=True) == 16
    # The epilogue's dot steps: (rank rows, K, prepared rank rows) for a block of tokens and a
    # pool of rank capacity 64 (whole chunks, at most the pool's; by default all).
    assert config.epilogue_blocks(32, 64) == (16, 256, 64)
    assert MatmulConfig(epilogue_prepared_rank_rows=16).epilogue_blocks(32, 64) == (16, 256, 16)
    assert config.epilogue_blocks(16, 8) == (8, 128, 8)
    assert MatmulConfig(epilogue_prepared_rank_rows=20).epilogue_blocks(32, 64) == (16, 256, 32)
    assert MatmulConfig(epilogue_prepared_rank_rows=999).epilogue_blocks(32, 64) == (16, 256, 64)
    assert MatmulConfig(epilogue_prepared_rank_rows=0).epilogue_blocks(32, 64) == (16, 256, 0)
    # The K split: the smallest power of two reaching min_programs, capped by max_split_k and
    # the K steps.
    fill = MatmulConfig(min_programs=256)
    assert [fill.split_k_for(p, 43) for p in (32, 128, 192, 344)] == [8, 2, 2, 1]
    assert fill.split_k_for(32, 3) == 2 and MatmulConfig(split_k=4).split_k_for(999, 3) == 3
    assert MatmulConfig(min_programs=256, max_split_k=4).split_k_for(32, 43) == 4
    # Sub-blocks: the program's rows by default, never more.
    assert [config.dot_block_m_for(bm) for bm in (16, 128)] == [16, 128]
    assert [MatmulConfig(dot_block_m=32).dot_block_m_for(bm) for bm in (16, 128)] == [16, 32]
    assert MatmulConfig(dot_block_m=32).dot_block_m_for(128, expand=False) == 128


def test_bad_inputs_raise_config_errors():
    prob, w, lora = _case("qkv", 8, jnp.float32)
    with pytest.raises(ConfigError, match="w must be"):
        lora_matmul(prob.x, w[0], 0)
    with pytest.raises(ConfigError, match="x must be"):
        lora_matmul(prob.x[:, :-1], w, 0)
    with pytest.raises(ConfigError, match="add up to"):
        lora_matmul(prob.x, w[..., :-16], 0, lora=lora)
    with pytest.raises(
        ConfigError, match=r"pallas_kernels/lora_matmul.py lora_matmul: lora\.v must"
    ):
        lora_matmul(prob.x, w, 0, lora=dataclasses.replace(lora, v=lora.v[:, :, :-1]))
    with pytest.raises(ConfigError, match="multiple of 16"):
        lora_matmul(prob.x, w[..., :40], 0)
    shrink = LoraShrink(
        a_pool=prob.a_pool, a_pages=prob.a_pages, rows=jnp.full((2, 16), -1, jnp.int32)
    )
    with pytest.raises(ConfigError, match=r"exactly one of lora\.v .* got both"):
        lora_matmul(prob.x, w, 0, lora=dataclasses.replace(lora, shrink=shrink))
    with pytest.raises(ConfigError, match=r"exactly one of lora\.v .* got neither"):
        lora_matmul(prob.x, w, 0, lora=dataclasses.replace(lora, v=None))
    for bad, message in (
        (dataclasses.replace(shrink, rows=shrink.rows[:, :8]), r"lora\.shrink\.rows must be"),
        (dataclasses.replace(shrink, a_pool=prob.a_pool[..., :-1]), r"lora\.shrink\.a_pool must"),
        (dataclasses.replace(shrink, a_pages=prob.a_pages[:1]), r"lora\.shrink\.a_pages must"),
    ):
        with pytest.raises(ConfigError, match=message):
            lora_matmul(prob.x, w, 0, lora=dataclasses.replace(lora, v=None, shrink=bad))
    # Each bad MatmulConfig field, and the message that must name it.
    for fields, message in (
        ({"block_n": 48}, "block_n"),
        ({"epilogue": "fused"}, "'epilogue': expected 'dot', 'rows', 'rows_prefetch'"),
        ({"epilogue_rank_rows": 12}, "epilogue_rank_rows"),
        ({"epilogue_block_k": 8}, "epilogue_block_k"),
        ({"expand_block_m": 24}, "'expand_block_m': expected a power of two >= 16"),
        ({"dot_block_m": 8}, "'dot_block_m': expected a power of two >= 16"),
        ({"min_block_m": 48}, "'min_block_m': expected a power of two >= 16"),
        ({"shrink_rows": 24}, "'shrink_rows': expected 0 .off. or a power of two"),
        ({"shrink_max_tokens": 0}, "'shrink_max_tokens': expected an int >= 1"),
        ({"plain_max_tokens": 0}, "'plain_max_tokens': expected an int >= 1"),
        ({"large_block_num_warps": 0}, "'large_block_num_warps': expected an int >= 1"),
        (
            {"prefetch_epilogue_max_tokens": 0},
            "'prefetch_epilogue_max_tokens': expected an int >= 1",
        ),
        ({"wide_epilogue_adapters": -1}, "'wide_epilogue_adapters': expected an int >= 0"),
        ({"wide_epilogue_min_tokens": 0}, "'wide_epilogue_min_tokens': expected an int >= 1"),
        (
            {"epilogue_prepared_rank_rows": -1},
            "'epilogue_prepared_rank_rows': expected an int >= 0",
        ),
        ({"split_k": 0}, "'split_k': expected an int >= 1"),
        ({"lora_first": "yes"}, "'lora_first': expected true, false or None"),
        ({"max_partial_share": 0}, "'max_partial_share': expected a number > 0 or None"),
        ({"narrow_block_n": None}, r"'narrow_block_n': .* dimension\), got None"),
    ):
        with pytest.raises(ConfigError, match=message):
            MatmulConfig(**fields)


def test_lora_projection_is_the_shrink_then_the_fused_expand():
    """lora_projection (the model's entry point) = sgmv_shrink + lora_matmul: the reference with
    the shrink reference's v."""
    prob, w, lora = _case("gate_up", 13, jnp.float32)
    y = lora_projection(
        prob.x,
        w,
        prob.a_pool,
        prob.b_pools,
        prob.a_pages,
        prob.b_pages,
        prob.ranks,
        prob.scales,
        jnp.asarray(prob.token_slot),
        prob.layer,
        weights=prob.weights,
        sgmv_config=SgmvConfig(decode_block_k=16, decode_shrink_rows=8),
        config=SMALL,
        interpret=True,
    )
    assert _rel_err(y, _reference_with_finite_v(prob, w, lora)) < TOL["float32"]


def test_config_from_json_names_the_flag_and_the_field():
    """benchmark.py --matmul_config: the engine's lora_matmul config from JSON, bad input named."""
    config = MatmulConfig.from_json('{"expand_block_m": 32}', where="--matmul_config")
    assert config == MatmulConfig(expand_block_m=32)
    assert MatmulConfig.from_json("{}", where="--matmul_config") == MatmulConfig()
    for text, message in (
        ("{bad", r"--matmul_config: not valid JSON"),
        ('{"expand_block": 32}', r"--matmul_config: unknown MatmulConfig field 'expand_block'"),
        ('{"expand_block_m": 48}', r"--matmul_config: .*'expand_block_m': expected a power"),
    ):
        with pytest.raises(ConfigError, match=message):
            MatmulConfig.from_json(text, where="--matmul_config")

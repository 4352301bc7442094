"""Decode attention over a paged KV cache, plus the KV writes and gathers the engine needs.

KV cache layout (the engine is written against it)::

    k_pool, v_pool  (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    page_table      (B, max_pages_per_seq) int32   page id of each row's i-th page
    seq_lens        (B,) int32                     tokens in the cache for the row, the current
                                                   one included; 0 = inactive row (output zeros)
    layer           () int32                       traced: the call sits inside a scan over layers

Token ``pos`` of a row lives at ``pool[layer, page_table[row, pos // page_size],
pos % page_size]``; the same page id addresses the same slot in every layer. Page-table entries at
or beyond a row's length are never read, so they may hold anything.

Query heads are grouped as in HF ``repeat_kv``: query head ``i`` attends with kv head
``i // (num_heads // num_kv_heads)``.

``paged_attention`` is a Pallas Triton kernel (flash-decoding: each program owns one (row, kv head,
kv split) and walks that split's pages in blocks with an online softmax; with several splits the
partial results are merged in jnp). ``paged_attention_reference`` computes the same in plain jnp.
With a sliding ``window`` (Mistral's and Phi-3's ``sliding_window``, HF's semantics: a query at
position p sees the keys at positions p - window + 1 .. p) each program skips the blocks wholly
before its row's window and masks the rest key by key; the engine releases a sequence's pages
wholly before its window (``jaxlora.engine.kv_cache``), and ``window_pages`` bounds the pages a
chunk of queries reads.

Writes: ``write_kv`` scatters a step's K/V with XLA. ``rope_write_kv_kernel`` (the model's
default with a Pallas impl) applies RoPE to q and k and writes k and v in one Pallas launch,
reading the fused q|k|v projection output, against ``rope_write_kv_reference``; it updates the
pools in place (aliased outputs) and drops the writes ``write_kv`` documents.

fp8 pools (``KVCacheConfig.cache_dtype``): every write goes through ``to_cache_dtype``
(saturating, scale 1.0) and every read is upcast to the query's dtype before the dots, so the
kernels compute as with a pool of the query's dtype holding the rounded values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.config import require_positive_ints
from jaxlora.errors import ConfigError

_WHERE = "pallas_kernels/paged_attention.py"
# A finite "minus infinity": masked logits must not turn the running max into -inf, or
# exp(-inf - -inf) would give NaN for rows whose block is fully masked.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Triton's tensor-core dot needs every dimension >= 16, so the query heads that share one kv head
# (often 1..8) are padded up to this many rows inside the kernel (masked loads, masked stores).
_MIN_DOT_ROWS = 16


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Tuning knobs of the decode kernel.

    pages_per_block: pages loaded per inner-loop step (block of pages_per_block * page_size keys);
    kv_splits: programs that share one (row, kv head), each walking a contiguous slice of the page
    table (flash-decoding; helps small batches with long sequences); num_warps / num_stages: Triton
    launch parameters.
    """

    pages_per_block: int = 4
    kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        require_positive_ints(
            self,
            ("pages_per_block", "kv_splits", "num_warps", "num_stages"),
            "PagedAttentionConfig",
        )
        if not _is_power_of_2(self.pages_per_block):
            raise ConfigError(
                f"PagedAttentionConfig field 'pages_per_block': expected a power "
                f"of 2 (Triton block shapes), got {self.pages_per_block}"
            )

    @property
    def name(self) -> str:
        return (
            f"paged_attention_p{self.pages_per_block}_k{self.kv_splits}"
            f"_w{self.num_warps}_s{self.num_stages}"
        )

    @classmethod
    def heuristic(
        cls,
        *,
        batch: int,
        num_kv_heads: int,
        max_pages_per_seq: int,
        page_size: int,
        target_programs: int = 264,
    ) -> PagedAttentionConfig:
        """A default for these shapes: ~64-key blocks, and enough kv splits to fill the GPU
        (target_programs: about two per SM of an H100 / H200, 132 SMs)."""
        pages_per_block = max(1, 64 // page_size)
        pages_per_block = min(pages_per_block, _next_power_of_2(max_pages_per_seq))
        blocks = -(-max_pages_per_seq // pages_per_block)
        wanted_splits = -(-target_programs // max(1, batch * num_kv_heads))
        kv_splits = max(1, min(_next_power_of_2(wanted_splits), blocks, 16))
        return cls(pages_per_block=pages_per_block, kv_splits=kv_splits, num_warps=4, num_stages=2)


def _check_cache_shapes(k_pool, v_pool, page_table, *, where: str) -> None:
    if k_pool.ndim != 5:
        raise ConfigError(
            f"{where}: k_pool must be (num_layers, num_pages, page_size, "
            f"num_kv_heads, head_dim), got shape {k_pool.shape}"
        )
    if v_pool.shape != k_pool.shape:
        raise ConfigError(
            f"{where}: v_pool shape {v_pool.shape} must equal k_pool shape {k_pool.shape}"
        )
    if page_table.ndim != 2 or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ConfigError(
            f"{where}: page_table must be (B, max_pages_per_seq) int32, got "
            f"{page_table.dtype}{list(page_table.shape)}"
        )


def _check_attention_inputs(q, k_pool, v_pool, page_table, seq_lens, *, where: str) -> None:
    _check_cache_shapes(k_pool, v_pool, page_table, where=where)
    _, _, _, num_kv_heads, head_dim = k_pool.shape
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ConfigError(
            f"{where}: q must be (B, num_heads, head_dim={head_dim}), got shape {q.shape}"
        )
    batch, num_heads, _ = q.shape
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{where}: q has {num_heads} heads, not a multiple of the pool's "
            f"num_kv_heads={num_kv_heads}"
        )
    if page_table.shape[0] != batch:
        raise ConfigError(
            f"{where}: page_table has {page_table.shape[0]} rows, q has batch {batch}"
        )
    if seq_lens.shape != (batch,) or not jnp.issubdtype(seq_lens.dtype, jnp.integer):
        raise ConfigError(
            f"{where}: seq_lens must be ({batch},) int32, got "
            f"{seq_lens.dtype}{list(seq_lens.shape)}"
        )


def window_pages(window: int, tokens: int, page_size: int) -> int:
    """The most pages holding the keys that ``tokens`` consecutive queries read under a sliding
    ``window``: from the first query's window start (window - 1 keys before it) to the last
    query, ceil((window - 1 + tokens) / page_size) + 1 (the span need not start on a page)."""
    return -(-(window - 1 + tokens) // page_size) + 1


def _check_softcap(logit_softcap, where: str) -> None:
    if logit_softcap is not None and (
        isinstance(logit_softcap, bool)
        or not isinstance(logit_softcap, int | float)
        or not logit_softcap > 0
    ):
        raise ConfigError(
            f"{_WHERE} {where}: logit_softcap={logit_softcap!r}; expected None or a number > 0"
        )


def _check_window(window, where: str) -> None:
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ConfigError(f"{_WHERE} {where}: window={window!r}; expected None or an int >= 1")


def to_cache_dtype(x: jax.Array, dtype) -> jax.Array:
    """x as a K/V pool of ``dtype`` stores it. fp8 saturates at the format's largest finite
    value (+-448 e4m3, +-57344 e5m2; a per-tensor scale of 1.0, as vLLM's without calibrated
    scales): a plain cast to float8_e4m3fn turns an out-of-range value into NaN, which would
    poison every later query of its row. Other dtypes: a plain cast."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -limit, limit)
    return x.astype(dtype)


def _layer_scalar(layer, num_layers: int) -> jax.Array:
    # Clamped so that a wrong layer index reads a wrong layer rather than out of bounds memory.
    return jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1)


def _paged_attention_kernel(
    # inputs
    layer_ref,  # (1,) int32
    seq_lens_ref,  # (B,) int32
    page_table_ref,  # (B, max_pages_per_seq) int32
    q_ref,  # (B, num_heads, head_dim)
    k_pool_ref,  # (L, P, page_size, KVH, D)
    v_pool_ref,  # (L, P, page_size, KVH, D)
    # with ``shrink``: pool_ref (L*P*R, num_heads * D) A rank-rows of o, pages_ref (S, 7, MP),
    # ranks_ref (S, 7), slot_ref (B,) int32 (each row's slot, -1 = no adapter)
    # outputs: (B, num_heads, D) in q's dtype with one split, else per-split unnormalised
    # accumulators (splits, B, num_heads, D) f32 and softmax stats m, l (splits, B, num_heads) f32;
    # with ``shrink`` (one split), then v_parts (B, KVH, G*MP*R) f32: each kv head's share of
    # the LoRA shrink of the output
    *refs,
    sm_scale: float,
    queries_per_kv: int,
    pages_per_block: int,
    pages_per_split: int,
    split_output: bool,
    window: int | None = None,
    shrink: dict | None = None,
    logit_softcap: float | None = None,
    layer_window: bool = False,
):
    # With ``layer_window`` the first of refs is the window of this launch's layer, (1,) int32
    # (Gemma 2's sliding layers: one scan body, a window that depends on the traced layer).
    window_ref, refs = (refs[0], refs[1:]) if layer_window else (None, refs)
    shrink_refs, out_refs = (refs[:4], refs[4:]) if shrink is not None else ((), refs)
    row = pl.program_id(0)
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    _, num_pages, page_size, _, head_dim = k_pool_ref.shape
    max_pages_per_seq = page_table_ref.shape[1]
    block_keys = pages_per_block * page_size
    padded_queries = max(_MIN_DOT_ROWS, _next_power_of_2(queries_per_kv))

    layer = layer_ref[0]
    seq_len = jnp.minimum(seq_lens_ref[row], max_pages_per_seq * page_size)
    num_heads = q_ref.shape[1]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    query_index = jnp.arange(padded_queries, dtype=jnp.int32)
    query_valid = query_index < queries_per_kv
    # Padding lanes point past the last head: masked on the GPU, dropped by interpret-mode stores.
    heads = jnp.where(query_valid, kv_head * queries_per_kv + query_index, num_heads)
    query_mask = jnp.broadcast_to(query_valid[:, None], (padded_queries, head_dim))
    # Every index is an integer array (no slices): the form both Triton and interpret mode take.
    q = pltriton.load(q_ref.at[row, heads[:, None], dims], mask=query_mask, other=0)
    # fp32 caches get exact fp32 products; bf16/fp16 use the tensor cores' native inputs.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT

    split_start = split * pages_per_split * page_size
    split_end = jnp.minimum(seq_len, split_start + pages_per_split * page_size)
    num_blocks = jnp.maximum(split_end - split_start + block_keys - 1, 0) // block_keys
    # A sliding window: the query (position seq_len - 1) sees the last ``window`` keys only;
    # the blocks wholly before them are skipped, the rest masked key by key.
    if layer_window:
        window_keys = window_ref[0]
    else:
        window_keys = window
    windowed = window_keys is not None
    first_key = jnp.maximum(seq_len - window_keys, 0) if windowed else 0
    first_block = jnp.maximum(first_key - split_start, 0) // block_keys

    masked_zero = 0.0 if k_pool_ref.dtype.itemsize == 1 else 0

    def body(block, carry):
        acc, running_max, denom = carry
        key_pos = split_start + block * block_keys + jnp.arange(block_keys, dtype=jnp.int32)
        key_valid = key_pos < split_end
        if windowed:
            key_valid = key_valid & (key_pos >= first_key)
        pages = pltriton.load(page_table_ref.at[row, key_pos // page_size], mask=key_valid, other=0)
        pages = jnp.clip(pages, 0, num_pages - 1)
        offsets = key_pos % page_size
        key_mask = jnp.broadcast_to(key_valid[:, None], (block_keys, head_dim))
        # fp8 pools are read in q's dtype (no-op casts when the pools are in it); their masked
        # lanes take a float 0 (the Triton lowering casts no integer to fp8), the other pools'
        # the integer 0 they always took.
        k = pltriton.load(
            k_pool_ref.at[layer, pages[:, None], offsets[:, None], kv_head, dims],
            mask=key_mask,
            other=masked_zero,
        ).astype(q.dtype)
        logits = pltriton.dot(q, k, trans_b=True, precision=precision) * sm_scale
        if logit_softcap is not None:
            logits = logit_softcap * jnp.tanh(logits / logit_softcap)
        logits = jnp.where(key_valid[None, :], logits, _MASK_VALUE)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - new_max[:, None])
        denom = denom * correction + jnp.sum(probs, axis=1)
        v = pltriton.load(
            v_pool_ref.at[layer, pages[:, None], offsets[:, None], kv_head, dims],
            mask=key_mask,
            other=masked_zero,
        ).astype(q.dtype)
        acc = acc * correction[:, None] + pltriton.dot(
            probs.astype(q.dtype), v, precision=precision
        )
        return acc, new_max, denom

    init = (
        jnp.zeros((padded_queries, head_dim), jnp.float32),
        jnp.full((padded_queries,), _MASK_VALUE, jnp.float32),
        jnp.zeros((padded_queries,), jnp.float32),
    )
    acc, running_max, denom = jax.lax.fori_loop(first_block, num_blocks, body, init)

    if split_output:
        acc_ref, max_ref, denom_ref = out_refs
        pltriton.store(acc_ref.at[split, row, heads[:, None], dims], acc, mask=query_mask)
        pltriton.store(max_ref.at[split, row, heads], running_max, mask=query_valid)
        pltriton.store(denom_ref.at[split, row, heads], denom, mask=query_valid)
    else:
        out_ref = out_refs[0]
        safe_denom = jnp.where(denom > 0, denom, 1.0)
        out = jnp.where(denom[:, None] > 0, acc / safe_denom[:, None], 0.0)
        pltriton.store(
            out_ref.at[row, heads[:, None], dims], out.astype(out_ref.dtype), mask=query_mask
        )
        if shrink is not None:
            _shrink_heads(
                out.astype(out_ref.dtype).astype(jnp.float32),
                layer_ref,
                *shrink_refs,
                out_refs[1],
                row=row,
                kv_head=kv_head,
                query_index=query_index,
                queries_per_kv=queries_per_kv,
                dims=dims,
                **shrink,
            )


def _shrink_heads(
    out,  # (padded queries, D) float32: this program's heads' output, rounded as stored
    layer_ref,
    pool_ref,
    pages_ref,
    ranks_ref,
    slot_ref,
    v_parts_ref,
    *,
    row,
    kv_head,
    query_index,
    queries_per_kv,
    dims,
    lanes,
    rank_rows,
):
    """The LoRA shrink of o over this program's heads: v_parts[row, kv_head, n] = sum over
    its heads h and dims d of out[h, d] * A[n, h * D + d], A the row's adapter's rank rows
    (rows past a weight's rank, and every row of a row without adapter, masked: 0)."""
    from pallas_kernels import sgmv as sgmv_ops

    head_dim = out.shape[1]
    n = jax.lax.broadcasted_iota(jnp.int32, (lanes,), 0)
    col_ok, live, a_i, out_i = sgmv_ops.token_rank_rows(
        n, slot_ref[row], layer_ref, pool_ref, pages_ref, ranks_ref, **rank_rows
    )
    v = jnp.zeros((lanes,), jnp.float32)
    for query in range(queries_per_kv):
        # This head's output row (a masked sum picks it: rows of a value are not indexable).
        head_out = jnp.sum(jnp.where(query_index[:, None] == query, out, 0.0), axis=0)
        columns = (kv_head * queries_per_kv + query) * head_dim + dims  # (1, D)
        a = pltriton.load(pool_ref.at[a_i[:, None], columns], mask=live[:, None], other=0)
        v += jnp.sum(a.astype(jnp.float32) * head_out[None, :], axis=1)
    pltriton.store(v_parts_ref.at[row, kv_head, out_i], v, mask=col_ok)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "window", "logit_softcap", "config", "interpret")
)
def paged_attention(
    q: jax.Array,  # (B, num_heads, head_dim)
    k_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    v_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    seq_lens: jax.Array,  # (B,) int32, 0 = inactive row
    layer: jax.Array | int,  # () int32
    *,
    sm_scale: float,
    window: int | None = None,
    logit_softcap: float | None = None,
    layer_window: jax.Array | None = None,  # () int32, traced: instead of window
    config: PagedAttentionConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # (B, num_heads, head_dim), q's dtype
    """One decode step of attention for every row, reading K/V straight from the paged pools.
    ``window``: a sliding window (Mistral's, Phi-3's ``sliding_window``): each row's query, at
    position seq_len - 1, attends to the keys at positions > seq_len - 1 - window only.
    ``logit_softcap``: scores capped as cap * tanh(score / cap) before the softmax (Gemma 2's
    attn_logit_softcapping). ``layer_window``: a window given as a traced value (Gemma 2's,
    whose sliding layers alternate with full ones inside one scan body: a window longer than
    every row for a full layer)."""
    return _paged_attention(
        q,
        k_pool,
        v_pool,
        page_table,
        seq_lens,
        layer,
        sm_scale=sm_scale,
        window=window,
        logit_softcap=logit_softcap,
        layer_window=layer_window,
        config=config,
        interpret=interpret,
        where="paged_attention",
    )


def attention_config(
    q: jax.Array, k_pool: jax.Array, page_table: jax.Array, config=None, *, where: str
) -> PagedAttentionConfig:
    """The config a decode launch over these shapes runs (``config`` or the heuristic's), its
    kv splits capped by the page table's blocks (profiles name the splits that run)."""
    _, _, page_size, num_kv_heads, _ = k_pool.shape
    batch, max_pages_per_seq = page_table.shape
    if config is None:
        config = PagedAttentionConfig.heuristic(
            batch=batch,
            num_kv_heads=num_kv_heads,
            max_pages_per_seq=max_pages_per_seq,
            page_size=page_size,
        )
    block_keys = config.pages_per_block * page_size
    if block_keys < 16:
        raise ConfigError(
            f"{where}: pages_per_block * page_size = {block_keys}; the Triton dot "
            "needs at least 16 keys per block"
        )
    blocks_total = -(-max_pages_per_seq // config.pages_per_block)
    return dataclasses.replace(config, kv_splits=min(config.kv_splits, blocks_total))


def _paged_attention(
    q,
    k_pool,
    v_pool,
    page_table,
    seq_lens,
    layer,
    *shrink_operands,
    sm_scale: float,
    config: PagedAttentionConfig | None,
    interpret: bool,
    where: str,
    window: int | None = None,
    weights: tuple[int, ...] = (),
    logit_softcap: float | None = None,
    layer_window: jax.Array | None = None,
):
    """paged_attention's launch; with ``shrink_operands`` (A pool, A pages, ranks, each row's
    slot: one split only) also the LoRA shrink of the output: (out, v_parts)."""
    _check_attention_inputs(q, k_pool, v_pool, page_table, seq_lens, where=where)
    batch, num_heads, head_dim = q.shape
    num_layers, _, page_size, num_kv_heads, _ = k_pool.shape
    max_pages_per_seq = page_table.shape[1]
    for field, value in (("head_dim", head_dim), ("page_size", page_size)):
        if not _is_power_of_2(value) or value < (16 if field == "head_dim" else 1):
            raise ConfigError(
                f"{where}: {field}={value}; the Triton kernel needs a power of 2"
                f"{' >= 16' if field == 'head_dim' else ''} (use "
                "paged_attention_reference for other shapes)"
            )
    _check_window(window, where)
    _check_softcap(logit_softcap, where)
    if layer_window is not None and (window is not None or shrink_operands):
        raise ConfigError(
            f"{_WHERE} {where}: layer_window takes the place of window, and the fused shrink "
            "takes neither"
        )
    config = attention_config(q, k_pool, page_table, config, where=where)
    kv_splits = config.kv_splits
    blocks_total = -(-max_pages_per_seq // config.pages_per_block)
    pages_per_split = -(-blocks_total // kv_splits) * config.pages_per_block
    split_output = kv_splits > 1

    if split_output:
        out_shape = (
            jax.ShapeDtypeStruct((kv_splits, batch, num_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((kv_splits, batch, num_heads), jnp.float32),
            jax.ShapeDtypeStruct((kv_splits, batch, num_heads), jnp.float32),
        )
    else:
        out_shape = (jax.ShapeDtypeStruct((batch, num_heads, head_dim), q.dtype),)
    shrink, extra_inputs = None, []
    name = config.name if window is None else f"{config.name}_window{window}"
    if logit_softcap is not None:
        name = f"{name}_softcap{logit_softcap:g}".replace(".", "p")
    if layer_window is not None:
        name = f"{name}_layer_window"
        extra_inputs = [jnp.asarray(layer_window, jnp.int32).reshape(1)]
    if shrink_operands:
        from pallas_kernels import sgmv as sgmv_ops

        a_pool, a_pages, ranks, token_slot = shrink_operands
        rank_rows = sgmv_ops.rank_row_statics(a_pool, a_pages, weights, interpret)
        columns = len(weights) * rank_rows["rank_cols"]
        shrink = dict(lanes=max(16, _next_power_of_2(columns)), rank_rows=rank_rows)
        out_shape += (jax.ShapeDtypeStruct((batch, num_kv_heads, columns), jnp.float32),)
        extra_inputs = extra_inputs + [
            a_pool.reshape(-1, a_pool.shape[-1]),
            a_pages.astype(jnp.int32),
            ranks.astype(jnp.int32),
            token_slot.astype(jnp.int32),
        ]
        name = f"{name}_shrink"
    kernel = functools.partial(
        _paged_attention_kernel,
        sm_scale=float(sm_scale),
        queries_per_kv=num_heads // num_kv_heads,
        pages_per_block=config.pages_per_block,
        pages_per_split=pages_per_split,
        split_output=split_output,
        window=window,
        shrink=shrink,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        layer_window=layer_window is not None,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, kv_splits),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=name,
    )(
        _layer_scalar(layer, num_layers).reshape(1),
        seq_lens.astype(jnp.int32),
        page_table.astype(jnp.int32),
        q,
        k_pool,
        v_pool,
        *extra_inputs,
    )
    if shrink is not None:
        return outs
    if not split_output:
        return outs[0]
    acc, split_max, split_denom = outs
    # Merge the splits' online-softmax states; splits that saw no key carry denom 0.
    global_max = jnp.max(split_max, axis=0)
    weight = jnp.where(split_denom > 0, jnp.exp(split_max - global_max[None]), 0.0)
    denom = jnp.sum(split_denom * weight, axis=0)
    numer = jnp.sum(acc * weight[..., None], axis=0)
    out = jnp.where(denom[..., None] > 0, numer / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    return out.astype(q.dtype)


def _check_shrink_operands(q, a_pool, a_pages, ranks, token_slot, weights, where):
    from pallas_kernels import sgmv as sgmv_ops

    batch, num_heads, head_dim = q.shape
    sgmv_ops.check_fused_shrink_operands(
        where,
        a_pool,
        a_pages,
        ranks,
        token_slot,
        weights,
        num_tokens=batch,
        width=num_heads * head_dim,
        expected="the A rows of the projection reading the attention output",
        where=_WHERE,
    )


def paged_attention_shrink_reference(
    # inputs
    q: jax.Array,  # (B, num_heads, head_dim)
    k_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    v_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    seq_lens: jax.Array,  # (B,) int32
    layer: jax.Array | int,  # () int32: the cache's layer and the A rows'
    a_pool: jax.Array,  # (L, P, R, num_heads * head_dim) A rank-rows of o
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (B,) int32, -1 = no adapter
    *,
    sm_scale: float,
    weights: tuple[int, ...],
    window: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # out (B, num_heads, head_dim), v (B, G, MP*R) float32
    """``paged_attention_reference``, then ``sgmv_shrink_reference`` of its output (flattened
    over the heads): attention and o's LoRA shrink, as the model runs them apart."""
    from pallas_kernels import sgmv as sgmv_ops

    where = "paged_attention_shrink_reference"
    _check_shrink_operands(q, a_pool, a_pages, ranks, token_slot, weights, where)
    out = paged_attention_reference(
        q, k_pool, v_pool, page_table, seq_lens, layer, sm_scale=sm_scale, window=window
    )
    a_layer = _layer_scalar(layer, a_pool.shape[0])
    v = sgmv_ops.sgmv_shrink_reference(
        out.reshape(q.shape[0], -1), a_pool, a_pages, ranks, token_slot, a_layer, weights=weights
    )
    return out, v


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "weights", "window", "config", "interpret")
)
def paged_attention_shrink(
    # inputs
    q: jax.Array,  # (B, num_heads, head_dim)
    k_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    v_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    seq_lens: jax.Array,  # (B,) int32, 0 = inactive row
    layer: jax.Array | int,  # () int32: the cache's layer and the A rows' (clamped to each)
    a_pool: jax.Array,  # (L, P, R, num_heads * head_dim) A rank-rows of o
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (B,) int32, -1 = no adapter
    *,
    sm_scale: float,
    weights: tuple[int, ...],
    window: int | None = None,
    config: PagedAttentionConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # out (B, num_heads, head_dim), v (B, G, MP*R) float32
    """``paged_attention_shrink_reference`` with o's LoRA shrink in the attention launch
    (``RunnerConfig.attention_shrink``, opt-in, not yet timed on a GPU): each program, one
    (row, kv head), dots its heads' output (rounded to q's dtype, as stored) with the A
    columns of those heads, and writes that share of v (B, KVH, G*MP*R) float32; XLA sums the
    kv heads' shares in one small fusion. Needs one kv split (``attention_config``): with
    several, the output exists only after the splits' merge.

    Why: o's shrink is an SGMV launch of its own a layer (4-5 us of a batch-32 H200 step for
    under 1 us of A rows at the copy rate, thirty-third session's profile); here each program
    reads only its heads' A columns (D of them a rank row), a few KB."""
    where = "paged_attention_shrink"
    _check_shrink_operands(q, a_pool, a_pages, ranks, token_slot, weights, where)
    if attention_config(q, k_pool, page_table, config, where=where).kv_splits != 1:
        raise ConfigError(
            f"{_WHERE} {where}: the shrink needs one kv split (the output is whole only after "
            "the splits' merge); this launch's config has more (attention_config)"
        )
    out, v_parts = _paged_attention(
        q,
        k_pool,
        v_pool,
        page_table,
        seq_lens,
        layer,
        a_pool,
        a_pages,
        ranks,
        token_slot,
        sm_scale=sm_scale,
        config=config,
        interpret=interpret,
        where=where,
        window=window,
        weights=tuple(weights),
    )
    v = v_parts.sum(axis=1)
    return out, v.reshape(q.shape[0], len(weights), -1)


def gather_kv(
    k_pool: jax.Array,  # (L, P, page_size, KVH, D)
    v_pool: jax.Array,  # (L, P, page_size, KVH, D)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    layer: jax.Array | int,  # () int32
    max_len: int,
    first_page: jax.Array | None = None,  # (B,) int32
) -> tuple[jax.Array, jax.Array]:  # k, v: (B, max_len, KVH, D) in the pool's dtype
    """Each row's first max_len cached positions, in order (chunked prefill attention); with
    ``first_page``, each row's max_len positions from the start of its page ``first_page[b]``
    (a sliding window's keys: position ``first_page[b] * page_size + j`` at j).

    Positions at or beyond a row's length hold whatever the pages hold (page-table indices past
    the table read its last entry): mask them.
    """
    _check_cache_shapes(k_pool, v_pool, page_table, where="gather_kv")
    num_layers, _, page_size, num_kv_heads, head_dim = k_pool.shape
    batch, max_pages_per_seq = page_table.shape
    pages_needed = -(-max_len // page_size)
    if max_len <= 0 or pages_needed > max_pages_per_seq:
        raise ConfigError(
            f"gather_kv: max_len={max_len} must be in 1.."
            f"{max_pages_per_seq * page_size} (page_table has {max_pages_per_seq}"
            f" pages of {page_size} per row)"
        )
    layer = _layer_scalar(layer, num_layers)
    if first_page is None:
        pages = page_table[:, :pages_needed].astype(jnp.int32)
    else:
        if first_page.shape != (batch,):
            raise ConfigError(
                f"gather_kv: first_page must have shape ({batch},) (a page-table index per "
                f"row), got {first_page.shape}"
            )
        index = first_page.astype(jnp.int32)[:, None] + jnp.arange(pages_needed)[None, :]
        index = jnp.clip(index, 0, max_pages_per_seq - 1)
        pages = jnp.take_along_axis(page_table, index, axis=1).astype(jnp.int32)

    def take(pool):
        # One gather indexed by (layer, page): never materialises pool[layer].
        rows = pool[layer, pages]  # (B, pages_needed, page_size, KVH, D)
        rows = rows.reshape(batch, pages_needed * page_size, num_kv_heads, head_dim)
        return rows[:, :max_len]

    return take(k_pool), take(v_pool)


def _check_write_inputs(k_pool, v_pool, k_new, v_new, page_table, positions, valid, where):
    _check_cache_shapes(k_pool, v_pool, page_table, where=where)
    _, _, _, num_kv_heads, head_dim = k_pool.shape
    batch = page_table.shape[0]
    token_shape = positions.shape
    if positions.ndim not in (1, 2) or token_shape[0] != batch:
        raise ConfigError(
            f"{where}: positions must be ({batch},) or ({batch}, S) to match the "
            f"page_table rows, got shape {token_shape}"
        )
    expected = (*token_shape, num_kv_heads, head_dim)
    for tensor_name, tensor in (("k_new", k_new), ("v_new", v_new)):
        if tensor.shape != expected:
            raise ConfigError(
                f"{where}: {tensor_name} must have shape {expected}, got {tensor.shape}"
            )
    if valid.shape != token_shape:
        raise ConfigError(f"{where}: valid must have shape {token_shape}, got {valid.shape}")


def write_kv(
    k_pool: jax.Array,  # (L, P, page_size, KVH, D)
    v_pool: jax.Array,  # (L, P, page_size, KVH, D)
    k_new: jax.Array,  # (*token_shape, KVH, D)
    v_new: jax.Array,  # (*token_shape, KVH, D)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    positions: jax.Array,  # token_shape int32: (B,) one token per row, or (B, S)
    layer: jax.Array | int,  # () int32
    valid: jax.Array,  # token_shape bool: False = write nothing for this token
) -> tuple[jax.Array, jax.Array]:
    """Scatters new tokens' K/V into the pools at their positions (``to_cache_dtype``: fp8
    pools saturate); returns the updated pools.

    Token shapes: ``(B,)`` (decode: token b belongs to page_table row b) or ``(B, S)`` (S tokens
    of row b). A packed prefill batch whose tokens come from several rows passes
    ``page_table[token_row]`` with positions of shape (T,). Invalid tokens, negative positions and
    positions beyond the page table write nothing. Two valid tokens with the same (row, position)
    is a caller bug (one of them wins).
    """
    _check_write_inputs(k_pool, v_pool, k_new, v_new, page_table, positions, valid, "write_kv")
    num_layers, num_pages, page_size, num_kv_heads, head_dim = k_pool.shape
    max_pages_per_seq = page_table.shape[1]

    positions = positions.astype(jnp.int32)
    page_slot = positions // page_size
    in_table = (positions >= 0) & (page_slot < max_pages_per_seq)
    table = page_table.astype(jnp.int32)
    if positions.ndim == 1:
        pages = jnp.take_along_axis(
            table, jnp.clip(page_slot, 0, max_pages_per_seq - 1)[:, None], axis=1
        )[:, 0]
    else:
        pages = jnp.take_along_axis(table, jnp.clip(page_slot, 0, max_pages_per_seq - 1), axis=1)
    writes = valid & in_table & (pages >= 0) & (pages < num_pages)
    # Tokens that must not write are sent to page num_pages (out of bounds) and dropped.
    pages = jnp.where(writes, pages, num_pages).reshape(-1)
    offsets = (positions % page_size).reshape(-1)
    layer = _layer_scalar(layer, num_layers)

    def scatter(pool, new):
        rows = to_cache_dtype(new.reshape(-1, num_kv_heads, head_dim), pool.dtype)
        return pool.at[layer, pages, offsets].set(rows, mode="drop")

    return scatter(k_pool, k_new), scatter(v_pool, v_new)


def _token_slot(positions_ref, valid_ref, page_table_ref, num_pages, page_size, tokens_per_row):
    """Program t's token as one-element vectors (scalar index arithmetic and selects mistype in
    the Triton lowering, see pallas_kernels/sgmv.py): (token, writes, page, offset)."""
    max_pages_per_seq = page_table_ref.shape[1]
    token = jnp.full((1,), pl.program_id(0), jnp.int32)
    position = pltriton.load(positions_ref.at[token])
    ok = (pltriton.load(valid_ref.at[token]) != 0) & (position >= 0)
    position = jnp.maximum(position, 0)
    row = jax.lax.div(token, jnp.int32(tokens_per_row))
    page_slot = jax.lax.div(position, jnp.int32(page_size))
    ok = ok & (page_slot < max_pages_per_seq)
    page = pltriton.load(page_table_ref.at[row, jnp.minimum(page_slot, max_pages_per_seq - 1)])
    ok = ok & (page >= 0) & (page < num_pages)
    page = jnp.clip(page, 0, num_pages - 1)
    return token, ok, page, position - page_slot * page_size


def _row_lanes(lanes: int, width: int):
    """Lane indices of a row of ``width`` values in ``lanes`` (a power of 2) and their mask.
    Padding lanes point past the row: masked on the GPU, dropped by interpret-mode stores (which
    would write a masked lane's old value back over a real lane's new one)."""
    lane = jnp.arange(lanes, dtype=jnp.int32)
    lane_ok = lane < width
    return jnp.where(lane_ok, lane, width), lane_ok


def _rope_write_kv_kernel(
    # inputs
    layer_ref,  # (1,) int32
    positions_ref,  # (T,) int32
    valid_ref,  # (T,) int32, 0 = write nothing (the query is rotated all the same)
    page_table_ref,  # (B, max_pages_per_seq) int32
    cos_ref,  # (T, D/2) float32
    sin_ref,  # (T, D/2) float32
    qkv_ref,  # (T, Wq + 2 W) Wq = H * D, W = KVH * D: q | k (before rotation) | v
    k_pool_in_ref,  # (L, P, page_size, W), the same buffer as k_pool_ref
    v_pool_in_ref,  # (L, P, page_size, W), the same buffer as v_pool_ref
    *refs,
    # with ``head_norm_eps``: q_scale_ref, k_scale_ref (D,) each, the q / k head norms' scales
    # outputs: q_out_ref (T, Wq) the rotated query, k_pool_ref and v_pool_ref (L, P, page_size, W)
    tokens_per_row: int,
    head_dim: int,
    q_half_lanes: int,
    kv_half_lanes: int,
    lanes: int,
    head_norm_eps: float | None = None,
):
    """Program (t, g) rotates head group g of token t's query and key (RoPE) and writes the
    group's rotated key and value heads into the token's page slot (or nothing): one launch for
    what XLA runs as a rotation fusion and two scatters (and the slices of q, k, v out of the
    fused projection). Groups split every part alike: the query's H / G heads, the key's and
    value's KVH / G. With ``head_norm_eps`` (Qwen3) each q and k head is RMS-normalized over
    head_dim first (``_head_rms_norm``)."""
    del k_pool_in_ref, v_pool_in_ref
    q_scale_ref = k_scale_ref = None
    if head_norm_eps is not None:
        q_scale_ref, k_scale_ref, *refs = refs
    q_out_ref, k_pool_ref, v_pool_ref = refs
    _, num_pages, page_size, width = k_pool_ref.shape
    groups = pl.num_programs(1)
    q_width, total = q_out_ref.shape[1], qkv_ref.shape[1]
    half = head_dim // 2
    token, ok, page, offset = _token_slot(
        positions_ref, valid_ref, page_table_ref, num_pages, page_size, tokens_per_row
    )
    group = pl.program_id(1)
    layer = layer_ref[0]
    # (part's first column in qkv, its width, lanes per half of a group, where it goes)
    for start, part_width, half_lanes, out_ref, scale_ref in (
        (0, q_width, q_half_lanes, q_out_ref, q_scale_ref),
        (q_width, width, kv_half_lanes, k_pool_ref, k_scale_ref),
    ):
        group_width = part_width // groups
        # Lane j owns the pair (first, first + half) of the group's head j // half; padding
        # lanes point past the rows (see _row_lanes).
        lane, lane_ok = _row_lanes(half_lanes, group_width // 2)
        head = jax.lax.div(lane, jnp.int32(half))
        angle = lane - head * half
        first = group * group_width + head * head_dim + angle
        cos = pltriton.load(cos_ref.at[token, angle], mask=lane_ok, other=0)
        sin = pltriton.load(sin_ref.at[token, angle], mask=lane_ok, other=0)
        x1, x2 = (
            pltriton.load(
                qkv_ref.at[token, jnp.where(lane_ok, start + column, total)], mask=lane_ok, other=0
            ).astype(jnp.float32)
            for column in (first, first + half)
        )
        if scale_ref is not None:
            x1, x2 = _head_rms_norm(
                x1, x2, scale_ref, angle, lane_ok, half, head_norm_eps, qkv_ref.dtype
            )
        # rotate_half_reference: float32 math, rounded to the input's dtype.
        rotated = (
            (x1 * cos - x2 * sin).astype(qkv_ref.dtype),
            (x2 * cos + x1 * sin).astype(qkv_ref.dtype),
        )
        for column, values in zip((first, first + half), rotated, strict=True):
            column = jnp.where(lane_ok, column, part_width)
            if out_ref is q_out_ref:
                pltriton.store(q_out_ref.at[token, column], values, mask=lane_ok)
            else:
                pltriton.store(
                    k_pool_ref.at[layer, page, offset, column],
                    to_cache_dtype(values, k_pool_ref.dtype),
                    mask=ok & lane_ok,
                )
    group_width = width // groups
    lane, lane_ok = _row_lanes(lanes, group_width)
    column = jnp.where(lane_ok, group * group_width + lane, width)
    values = pltriton.load(
        qkv_ref.at[token, jnp.where(lane_ok, q_width + width + column, total)],
        mask=lane_ok,
        other=0,
    )
    pltriton.store(
        v_pool_ref.at[layer, page, offset, column],
        to_cache_dtype(values, v_pool_ref.dtype),
        mask=ok & lane_ok,
    )


def _head_rms_norm(x1, x2, scale_ref, angle, lane_ok, half, eps, dtype):
    """RMSNorm over each head of a part's lanes (pallas_kernels.residual_norm.rms_norm's
    arithmetic: float32 normalization, rounded to the input's dtype, times the rounded scale),
    as float32 values. Lane j holds the pair (angle, angle + half) of head j // half, so a
    head's sum of squares is a row sum of the lanes reshaped to (heads, half); padding lanes
    hold zeros, in rows of their own."""
    lanes = x1.shape[0]
    squares = (x1 * x1 + x2 * x2).reshape(lanes // half, half)
    mean = jnp.sum(squares, axis=1, keepdims=True) / (2 * half)
    inv = jnp.broadcast_to(jax.lax.rsqrt(mean + eps), (lanes // half, half)).reshape(lanes)
    normed = []
    for x, column in ((x1, angle), (x2, angle + half)):
        scale = pltriton.load(scale_ref.at[column], mask=lane_ok, other=0).astype(dtype)
        normed.append((scale * (x * inv).astype(dtype)).astype(jnp.float32))
    return tuple(normed)


def rotate_half_reference(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE. x: (*token_shape, N, D); cos, sin: (*token_shape, D/2) float32.
    float32 math, x's dtype out."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _check_head_norms(head_norms, head_dim: int, where: str) -> None:
    if head_norms is None:
        return
    if len(head_norms) != 2 or any(tuple(s.shape) != (head_dim,) for s in head_norms):
        raise ConfigError(
            f"{_WHERE} {where}: head_norms must be (q's scale, k's scale) of shape "
            f"({head_dim},) each, got {[tuple(s.shape) for s in head_norms]}"
        )


def _check_rope_inputs(qkv, cos, sin, positions, k_pool, v_pool, page_table, valid, where) -> int:
    """Every check of ``write_kv`` for qkv's k and v heads, and qkv's and the tables' shapes;
    returns the number of query heads in ``qkv``."""
    _check_cache_shapes(k_pool, v_pool, page_table, where=where)
    token_shape = positions.shape
    num_kv_heads, head_dim = k_pool.shape[3:]
    heads = qkv.shape[-2] - 2 * num_kv_heads if qkv.ndim == len(token_shape) + 2 else 0
    if qkv.shape[:-2] != token_shape or qkv.shape[-1] != head_dim or heads < 1:
        expected = ", ".join([*map(str, token_shape), f"H + {2 * num_kv_heads}", str(head_dim)])
        raise ConfigError(
            f"{where}: qkv must have shape ({expected}) (q | k | v heads), got {qkv.shape}"
        )
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim must be even for RoPE, got {head_dim}")
    expected = (*token_shape, head_dim // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != expected:
            raise ConfigError(f"{where}: {name} must have shape {expected}, got {table.shape}")
    kv_spec = jax.ShapeDtypeStruct((*token_shape, num_kv_heads, head_dim), qkv.dtype)
    _check_write_inputs(k_pool, v_pool, kv_spec, kv_spec, page_table, positions, valid, where)
    return heads


def rope_write_kv_reference(
    qkv: jax.Array,  # (*token_shape, H + 2 KVH, D): q | k (before its rotation) | v heads
    cos: jax.Array,  # (*token_shape, D/2) float32
    sin: jax.Array,  # (*token_shape, D/2) float32
    k_pool: jax.Array,  # (L, P, page_size, KVH, D)
    v_pool: jax.Array,  # (L, P, page_size, KVH, D)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    positions: jax.Array,  # token_shape int32
    layer: jax.Array | int,  # () int32
    valid: jax.Array,  # token_shape bool (or int, 0 = False)
    *,
    head_norms: tuple[jax.Array, jax.Array] | None = None,  # q's, k's scales (D,) each
    head_norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rotated q, k_pool, v_pool): ``rotate_half_reference`` of q and k, then ``write_kv``.
    ``head_norms`` (Qwen3): each q and k head RMS-normalized over head_dim first, with those
    scales (``residual_norm.rms_norm``)."""
    from pallas_kernels.residual_norm import rms_norm

    where = "rope_write_kv_reference"
    heads = _check_rope_inputs(qkv, cos, sin, positions, k_pool, v_pool, page_table, valid, where)
    _check_head_norms(head_norms, qkv.shape[-1], where)
    q, k_new, v_new = jnp.split(qkv, (heads, qkv.shape[-2] - k_pool.shape[3]), axis=-2)
    if head_norms is not None:
        q = rms_norm(q, head_norms[0], head_norm_eps, qkv.dtype)
        k_new = rms_norm(k_new, head_norms[1], head_norm_eps, qkv.dtype)
    k_rot = rotate_half_reference(k_new, cos, sin)
    pools = write_kv(k_pool, v_pool, k_rot, v_new, page_table, positions, layer, valid != 0)
    return (rotate_half_reference(q, cos, sin), *pools)


def rope_write_kv_kernel(
    qkv: jax.Array,  # (*token_shape, H + 2 KVH, D): q | k (before its rotation) | v heads
    cos: jax.Array,  # (*token_shape, D/2) float32
    sin: jax.Array,  # (*token_shape, D/2) float32
    k_pool: jax.Array,  # (L, P, page_size, KVH, D)
    v_pool: jax.Array,  # (L, P, page_size, KVH, D)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    positions: jax.Array,  # token_shape int32: (B,) one token per row, or (B, S)
    layer: jax.Array | int,  # () int32
    valid: jax.Array,  # token_shape bool or int32 (0 = write nothing for this token)
    *,
    head_norms: tuple[jax.Array, jax.Array] | None = None,  # q's, k's scales (D,) each
    head_norm_eps: float = 1e-6,
    max_head_groups: int = 8,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``rope_write_kv_reference`` as one Pallas Triton launch: program (t, g) rotates head group
    g of token t's q and k and writes the group's k and v heads in place (the pools are aliased
    to the outputs), with every check and dropped write of ``write_kv``.

    - Groups: the largest power of two up to ``max_head_groups`` dividing both head counts.
      One program per token (5 us a layer at batch 32 on the H200) leaves most SMs idle.
    - It reads the fused q|k|v projection's output as it is: XLA would copy out each slice
      before a custom call.
    - XLA runs the rotation and each scatter as separate kernels, 3-4 us each per layer at
      batch 32 (docs/BENCHMARKS.md, eleventh session).
    - An int32 ``valid`` skips a conversion per call (the model converts once a step).
    - ``head_norms`` (Qwen3's q / k norms): each program normalizes its heads before rotating
      them, where XLA would run the norms and a concatenation of q|k|v back (head_dim a power
      of two)."""
    where = "rope_write_kv_kernel"
    heads = _check_rope_inputs(qkv, cos, sin, positions, k_pool, v_pool, page_table, valid, where)
    _check_head_norms(head_norms, qkv.shape[-1], where)
    if head_norms is not None and not _is_power_of_2(qkv.shape[-1]):
        raise ConfigError(
            f"{_WHERE} {where}: head_norms need a power-of-two head_dim (a head's lanes are "
            f"one row of a power-of-two tile), got {qkv.shape[-1]}; use rope_write_kv_reference"
        )
    num_layers, num_pages, page_size, num_kv_heads, head_dim = k_pool.shape
    width = num_kv_heads * head_dim
    q_width = heads * head_dim
    num_tokens = positions.size
    tokens_per_row = 1 if positions.ndim == 1 else positions.shape[1]
    q_shape = (*positions.shape, heads, head_dim)
    if num_tokens == 0:
        return jnp.zeros(q_shape, qkv.dtype), k_pool, v_pool
    pool_shape = (num_layers, num_pages, page_size, width)
    groups = 1
    while (
        2 * groups <= max_head_groups
        and heads % (2 * groups) == 0
        and num_kv_heads % (2 * groups) == 0
    ):
        groups *= 2
    lanes = _next_power_of_2(width // groups)
    kernel = functools.partial(
        _rope_write_kv_kernel,
        tokens_per_row=tokens_per_row,
        head_dim=head_dim,
        q_half_lanes=_next_power_of_2(q_width // groups // 2),
        kv_half_lanes=_next_power_of_2(width // groups // 2),
        lanes=lanes,
        head_norm_eps=None if head_norms is None else float(head_norm_eps),
    )
    norm_inputs = () if head_norms is None else tuple(s.reshape(head_dim) for s in head_norms)
    q_out, k_out, v_out = pl.pallas_call(
        kernel,
        grid=(num_tokens, groups),
        out_shape=(
            jax.ShapeDtypeStruct((num_tokens, q_width), qkv.dtype),
            jax.ShapeDtypeStruct(pool_shape, k_pool.dtype),
            jax.ShapeDtypeStruct(pool_shape, v_pool.dtype),
        ),
        input_output_aliases={7: 1, 8: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"rope_write_kv_q{q_width}_g{groups}_w{lanes}_warps{num_warps}"
        + ("_headnorm" if head_norms is not None else ""),
    )(
        _layer_scalar(layer, num_layers).reshape(1),
        positions.astype(jnp.int32).reshape(-1),
        valid.astype(jnp.int32).reshape(-1),
        page_table.astype(jnp.int32),
        cos.astype(jnp.float32).reshape(num_tokens, head_dim // 2),
        sin.astype(jnp.float32).reshape(num_tokens, head_dim // 2),
        qkv.reshape(num_tokens, q_width + 2 * width),
        k_pool.reshape(pool_shape),
        v_pool.reshape(pool_shape),
        *norm_inputs,
    )
    return q_out.reshape(q_shape), k_out.reshape(k_pool.shape), v_out.reshape(v_pool.shape)


def paged_attention_reference(
    q: jax.Array,  # (B, num_heads, head_dim)
    k_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    v_pool: jax.Array,  # (L, P, page_size, KVH, head_dim)
    page_table: jax.Array,  # (B, max_pages_per_seq) int32
    seq_lens: jax.Array,  # (B,) int32
    layer: jax.Array | int,  # () int32
    *,
    sm_scale: float,
    window: int | None = None,
    logit_softcap: float | None = None,
    layer_window: jax.Array | None = None,
) -> jax.Array:  # (B, num_heads, head_dim), q's dtype
    """paged_attention in plain jnp: gather every row's pages, fp32 masked softmax."""
    _check_attention_inputs(
        q, k_pool, v_pool, page_table, seq_lens, where="paged_attention_reference"
    )
    _check_window(window, "paged_attention_reference")
    _check_softcap(logit_softcap, "paged_attention_reference")
    batch, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pool.shape
    max_len = page_table.shape[1] * page_size
    k, v = gather_kv(k_pool, v_pool, page_table, layer, max_len)
    queries_per_kv = num_heads // num_kv_heads
    q_grouped = q.astype(jnp.float32).reshape(batch, num_kv_heads, queries_per_kv, head_dim)
    logits = (
        jnp.einsum(
            "bhgd,bshd->bhgs", q_grouped, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        * sm_scale
    )
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    key_pos = jnp.arange(max_len)[None, :]
    key_valid = key_pos < seq_lens[:, None]  # (B, max_len)
    window = window if layer_window is None else layer_window
    if window is not None:
        key_valid = key_valid & (key_pos >= seq_lens[:, None] - window)
    logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
    row_active = seq_lens > 0
    # Inactive rows would softmax over all -inf; give them finite logits and zero them after.
    logits = jnp.where(row_active[:, None, None, None], logits, 0.0)
    weights = jax.nn.softmax(logits, axis=-1)
    # Slots past a row's length may hold anything, NaN included: 0 * NaN would leak through.
    v = jnp.where(key_valid[:, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bhgs,bshd->bhgd", weights, v, precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(row_active[:, None, None, None], out, 0.0)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)

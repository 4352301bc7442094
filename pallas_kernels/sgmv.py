"""SGMV LoRA shrink / expand over the paged adapter pool (layout: pallas_kernels/layout.py).

shrink:  v[t, g, :r] = x[t] @ A_{w_g}[slot_t]            (T, G, MP*R), float32
expand:  y[t, cols_g] += scale[slot_t, w_g] * v[t, g, :r] @ B_{w_g}[slot_t]

G is the number of weights in a fused module group (q|k|v: 3, gate|up: 2, o and down: 1); they
share the input x (so one shrink) and write column slices of one fused output (so one expand).
Tokens whose slot is NO_ADAPTER get v = 0 and leave y untouched.

Beside the plain-jnp references sit the Pallas Triton kernels ``sgmv_shrink`` / ``sgmv_expand``:
one ``pallas_call`` per (layer, group, shrink|expand) whatever the number of distinct adapters.
``sgmv_apply`` runs both for a group and updates y; ``sgmv_delta`` (the model's entry point)
returns the float32 delta instead, for XLA to add where the base outputs are consumed.

Page pool as the kernels read it
--------------------------------
A pool ``(L, P, R, W)`` is passed whole with a traced ``layer`` scalar and viewed as ``L*P*R``
rows of width W (a free reshape, never a copy of one layer). Rank-row ``i`` of weight ``w`` of the
adapter in slot ``s`` is pool row ``(layer * P + pages[s, w, i // R]) * R + i % R``. Rows with
``i >= ranks[s, w]`` are never loaded: the loads are masked, so whatever another adapter left in
the tail of a page (NaN included) is never read. Page ids and the layer are clamped into the pool
so that a bad id can read the wrong rows but never outside the pool.

v as the kernels see it
-----------------------
v ``(T, G, MP*R)`` float32 is addressed as ``(T, G*MP*R)``: column ``g*MP*R + i`` is rank-row i of
weight g. Columns ``i >= rank`` are zero. In expand they are masked again, so v may carry garbage.

Two regimes, chosen statically per kernel by ``SgmvConfig.regime(T, kernel)``
----------------------------------------------------------------------------
decode  (shrink: T <= ``decode_shrink_max_tokens`` and T * G*MP*R <=
        ``decode_shrink_max_token_rows``; expand: T <= ``decode_max_tokens``): one program per
        (token, block of rank rows) for shrink and per (token, block of y columns)
        for expand; tokens in any order, no metadata beyond token_slot; arithmetic on the CUDA
        cores (a token's work is a matrix-vector product).
prefill (larger T): tokens sorted by slot and cut into tiles of tokens of one slot;
        ``pltriton.dot`` on the tensor cores; an adapter's rows are read once per tile instead of
        once per token. The grids are flat and static (NT tiles is only an upper bound); each
        program maps its id to a work item from the number of tiles in use, read at run time:
        shrink items are (tile, block of v columns, K split), expand items are (tile, run of y
        column blocks). When few tiles are in use (one adapter) the shrink splits the reduction
        over the input width (with ``deterministic``, the default, float32 partials that the
        wrapper sums in one fixed order; without, atomic adds into a zeroed v) and the expand
        gives each program one column block; when many are (many adapters) the shrink does not
        split and the expand walks up to ``expand_col_steps`` column blocks per program
        (software-pipelined loads of B and y). Programs beyond the work exit at once.

A third choice, made by the caller: ``per_token=True`` (a static argument) runs the decode
kernels wherever T would take the prefill tiles, with their own knobs (``per_token_*``). A tile
of one slot's tokens saves nothing when each adapter has one token, and the per-token kernels
then read the same bytes with no tensor-core padding. Whether a batch is such is known on the
host from its token slots and ranks: ``choose_per_token(token_slot, ranks)``.

A fourth, also the caller's: the tile sizes. ``choose_tiles(token_slot, ranks)`` returns the
config with larger tiles (``large_*``) for a batch of long runs of one adapter (a prompt),
where 16-token tiles would read the adapter's rows once per 16 tokens; the caller builds the
metadata and runs the kernels with the config it returns.

Prefill metadata (``build_sgmv_metadata``, int32, static shapes)
-----------------------------------------------------------------
    sorted_tokens       (T,)    token ids sorted by slot (stable); NO_ADAPTER tokens last
    shrink_tile_start   (NTs,)  first position in sorted_tokens of the tile
    shrink_tile_size    (NTs,)  tokens in the tile, 1..shrink_block_tokens; 0 = unused tile
    shrink_tile_slot    (NTs,)  slot of the tile's tokens; NO_ADAPTER (-1): base-only tokens
    expand_tile_start   (NTe,)  the same for tiles of at most expand_block_tokens tokens
    expand_tile_size    (NTe,)
    expand_tile_slot    (NTe,)
    shrink_num_tiles    (1,)    tiles in use (they come first)
    expand_num_tiles    (1,)

NT = ``num_tiles_bound(T, S, bt) = min(T, ceil(T / bt) + min(T, S + 1) - 1)`` for tile size bt:
the tokens of each of the at most S + 1 segments (S slots and NO_ADAPTER) are cut into
ceil(n / bt) tiles. Used tiles come first, in slot order. The host builder (numpy) and
``build_sgmv_metadata_jnp`` (inside jit) produce identical arrays; the metadata must be built with
the same tile sizes as the config the kernels get (the shapes are checked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.config import parse_json
from jaxlora.errors import AdapterError, ConfigError
from pallas_kernels.layout import MODULES, NO_ADAPTER

_NUM_WEIGHTS = len(MODULES)
_TILE_FIELDS = ("start", "size", "slot")
_META_KEYS = (
    "sorted_tokens",
    *(f"{kind}_tile_{f}" for kind in ("shrink", "expand") for f in _TILE_FIELDS),
    "shrink_num_tiles",
    "expand_num_tiles",
)


def _gather_rows(pool, layer, pages, ranks):
    """Rows of one weight for every token: (T, MP*R, W) float32, rows >= rank zeroed.

    pool: (L, P, R, W); pages: (T, MP) int32; ranks: (T,) int32.
    """
    _, _, rows_per_page, width = pool.shape
    t, mp = pages.shape
    rows = jnp.take(pool[layer], pages, axis=0).reshape(t, mp * rows_per_page, width)
    keep = jnp.arange(mp * rows_per_page)[None, :] < ranks[:, None]
    return jnp.where(keep[:, :, None], rows.astype(jnp.float32), 0.0)


def sgmv_shrink_reference(
    # inputs
    x: jax.Array,  # (T, in) activations
    a_pool: jax.Array,  # (L, P, R, in) A rank-rows
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32, -1 = no adapter
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],  # weight indices of the group, e.g. (0, 1, 2) for q|k|v
) -> jax.Array:  # (T, G, MP*R) float32
    valid = token_slot >= 0
    slot = jnp.where(valid, token_slot, 0)
    outs = []
    for w in weights:
        r = jnp.where(valid, ranks[slot, w], 0)
        rows = _gather_rows(a_pool, layer, a_pages[slot, w], r)
        outs.append(
            jnp.einsum(
                "ti,tri->tr", x.astype(jnp.float32), rows, precision=jax.lax.Precision.HIGHEST
            )
        )
    return jnp.stack(outs, axis=1)


def sgmv_expand_reference(
    # inputs
    y: jax.Array,  # (T, sum of out widths) the fused base output, updated
    v: jax.Array,  # (T, G, MP*R) float32 from shrink
    b_pools: tuple[jax.Array, ...],  # G pools, (L, P, R, out_g) each (may repeat one array)
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
) -> jax.Array:  # (T, sum of out widths), y's dtype
    valid = token_slot >= 0
    slot = jnp.where(valid, token_slot, 0)
    deltas = []
    for g, w in enumerate(weights):
        r = jnp.where(valid, ranks[slot, w], 0)
        rows = _gather_rows(b_pools[g], layer, b_pages[slot, w], r)
        delta = jnp.einsum(
            "tr,tro->to", v[:, g, :].astype(jnp.float32), rows, precision=jax.lax.Precision.HIGHEST
        )
        deltas.append(delta * jnp.where(valid, scales[slot, w], 0.0)[:, None])
    width = sum(d.shape[-1] for d in deltas)
    if width != y.shape[-1]:
        raise ValueError(
            f"expand: the group's widths add up to {width}, y has {y.shape[-1]} columns"
        )
    # One concatenated delta rather than .at[slice].add per weight: a full-width slice update
    # crashes XLA's partitioner under pmap / shard_map on several devices (jax 0.11.2).
    return (y.astype(jnp.float32) + jnp.concatenate(deltas, axis=-1)).astype(y.dtype)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


class KernelConfig:
    """Base of the kernels' frozen config dataclasses (``SgmvConfig``, ``MatmulConfig``): built
    from ``{field: value}`` or its JSON (a flag), bad input named by ``where``."""

    @classmethod
    def from_dict(cls, fields, *, where: str, set_elsewhere=None):
        """A non-object, an unknown field or a refused value raises ``ConfigError`` naming
        ``where``. ``set_elsewhere``: {field: the option that sets it}, fields the caller sets
        from its own option (a field given here would be overridden without a word)."""
        name = cls.__name__
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{where}: expected an object of {name} fields, got {type(fields).__name__}"
            )
        for field, option in (set_elsewhere or {}).items():
            if field in fields:
                raise ConfigError(f"{where}: {name} field {field!r} is set by {option}, not here")
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown {name} field {unknown[0]!r}; expected one of {known}"
            )
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e

    @classmethod
    def from_json(cls, text: str, *, where: str, set_elsewhere=None):
        return cls.from_dict(
            parse_json(text, where=where), where=where, set_elsewhere=set_elsewhere
        )


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SgmvConfig(KernelConfig):
    """Tuning knobs of the SGMV kernels (defaults from a sweep on an H200, bf16, hidden 4096:
    docs/BENCHMARKS.md, "the sweep").

    Block sizes are powers of two; the kernels shrink a block to the problem where the problem is
    smaller (tiny test shapes), never below 16 where it feeds a tensor-core dot. ``None`` for
    ``shrink_split_k`` / ``expand_col_steps`` / ``decode_shrink_rows`` picks them from the shapes;
    the prefill kernels then choose, at run time from the number of tiles in use, the split and
    the column run that give every one of ``target_programs`` SMs about ``*_waves`` programs.
    """

    decode_max_tokens: int = 16  # T <= this: decode expand (per token); larger T: prefill tiles
    # T <= this: decode shrink; None: decode_max_tokens. The per-token shrink stays cheaper up to
    # larger T than the per-token expand, which re-reads an adapter's B for each of its tokens.
    decode_shrink_max_tokens: int | None = 64
    # ... and T x (v columns) <= this; None: no such limit. The per-token shrink reads each
    # token's A rows again (from L2), T x columns rows of the input width; past 2,048 the tiled
    # shrink, which reads an adapter's rows once per tile, was faster (H200, twenty-first
    # session: shrink + expand 0.47x-1.14x, 0.91x over the 24 rows it moves). The pool's
    # columns count, not the ranks: q|k|v of rank 8 in pages of 16 lost 4-14% at T = 64.
    decode_shrink_max_token_rows: int | None = 2048
    target_programs: int = 132  # streaming multiprocessors (an H100 SXM has 132)
    shrink_waves: int = 4  # the shrink splits K until the tiles in use give SMs this many programs
    # ... and this many above ``shrink_large_tokens`` tokens, where fewer, longer K splits stream
    # x better (H200, twenty-first session, T = 4,096: the shrink 0.67x-1.00x its time with 4
    # waves, shrink + expand 0.88x-1.00x; at T = 128 one wave was 10% slower, at 1,024 even).
    shrink_large_waves: int = 1
    shrink_large_tokens: int = 1024
    expand_waves: int = 4  # expand programs walk columns while SMs still get this many programs
    # prefill
    shrink_block_tokens: int = 16  # tokens of one slot per shrink tile (the M of its dots)
    shrink_block_n: int = 64  # v columns per shrink program
    # Input-width step of the shrink loop; None: 64 up to ``shrink_small_tokens`` tokens (more,
    # shorter K splits for the few tiles of a decode batch), 256 above (fewer, longer steps).
    shrink_block_k: int | None = None
    shrink_small_tokens: int = 128
    shrink_split_k: int | None = None  # most programs splitting the input width
    # True (default): the split's programs write float32 partials (split, T, columns) that the
    # wrapper sums in a fixed order: the same bits on every run. False: they add into v with
    # atomics, whose order of float adds follows the GPU's scheduling. Either way one small XLA
    # kernel runs beside the shrink: the sum of the partials, or the zeros the atomic adds start
    # from. On the H200 the partials were no slower (docs/BENCHMARKS.md, fourteenth session).
    deterministic: bool = True
    shrink_num_warps: int = 4
    shrink_num_stages: int = 3
    expand_block_tokens: int = 16  # tokens of one slot per expand tile
    expand_block_n: int = 128  # y columns per step of an expand program
    expand_col_steps: int | None = None  # most column blocks per expand program (pipelined)
    expand_num_warps: int = 4
    expand_num_stages: int = 3
    # True: the prefill expand loads the next column step's y tile before the current step's
    # dot, carried through the loop. Triton pipelines only the loads that feed a dot (B's), so
    # without it each step waits for its y read (docs/BENCHMARKS.md, sixteenth session). Off:
    # over the 120 prefill rows of issue 3's grid (H200, twentieth session) it took 0.982x the
    # expand's time (geometric mean; rows from 0.80x to 1.21x) and 0.991x the shrink + expand,
    # and the rows at >= 70% of copy went from 22 to 20 of 91: within one run's noise.
    expand_prefetch_y: bool = False
    # decode
    decode_shrink_rows: int | None = None  # v columns (rank rows) per decode shrink program
    decode_block_k: int = 2048  # input-width step of the decode shrink loop
    decode_shrink_num_warps: int = 8
    decode_shrink_num_stages: int = 2
    decode_expand_block_n: int = 256  # y columns per decode expand program
    decode_rank_chunk: int = 64  # rank rows per step of the decode expand loop
    decode_expand_num_warps: int = 4
    decode_expand_num_stages: int = 3
    # per token at any T: with ``per_token=True`` the decode kernels replace the prefill tiles
    # wherever T would take them, with the knobs below (``pC`` of the twenty-second session).
    # The host picks it per batch with ``choose_per_token``: per token when the batch's tokens
    # per adapter times its mean rank is at most ``per_token_max_rows`` (None: never). Per token
    # an adapter's rank rows are read once for each of its tokens, a tile reads them once; the
    # H200 sweep of the twenty-third session (108 rows of issue 3's grid, T >= 64) had per token
    # at 0.57x-1.03x the tiles' time wherever that product was <= 31 (rank 8 with up to 2.75
    # tokens an adapter, rank 16 with up to 1.9). Above, 0.81x-1.38x on rank 64's distinct rows
    # (64; slower on 10 of 12) and 0.92x-19x on the rows with more tokens an adapter.
    per_token_max_rows: int | None = 32
    per_token_shrink_rows: int = 4  # v columns (rank rows) per per-token shrink program
    per_token_block_k: int = 512  # input-width step of the per-token shrink loop
    per_token_shrink_num_warps: int = 4
    per_token_shrink_num_stages: int = 4
    per_token_expand_block_n: int = 1024  # y columns per per-token expand program
    per_token_expand_num_warps: int = 4
    per_token_expand_num_stages: int = 3
    # Tokens one per-token expand program walks (1: one token a program). Walking, each token's
    # slot, rank, scale and B page rows are looked up one token ahead, so that B's loads need
    # not wait on that chain of dependent reads; used where one rank chunk holds a weight's
    # rank rows (rank_cols <= decode_rank_chunk). H200, twenty-fourth session (distinct rows
    # of issue 3's grid, ranks 8 / 16 / 32, T = 256-4,096, out 4,096 and 3 x 4,096): 2 tokens
    # took 0.89x-0.98x one token's time on all 18 rows (geometric mean 0.93x); 4 similar at
    # T >= 1,024 but up to 1.02x at T = 256 (fewer programs), 8 and 16 up to 1.2x / 1.6x there.
    # One token a program wherever walking would leave fewer than ``target_programs`` programs.
    per_token_expand_tokens: int = 2
    # Larger tiles for batches of long runs of one adapter's tokens, picked on the host from the
    # batch (``choose_tiles``, which returns this config with the tile knobs replaced): a tile
    # reads its adapter's A (B) rows once, so 16-token tiles of a 4,096-token prompt read them
    # 256 times from L2. H200, twenty-fifth session (issue 3's identical, uniform and skewed
    # rows, T = 256-4,096, out 4,096 and 3 x 4,096, ranks 16 and 64): shrink tiles of 64 tokens
    # with 128-wide K steps took 0.47x-1.10x the shrink's time on the 20 rows with >= 32 tokens
    # an adapter (16 faster, the slowest with one rank-16 weight; 3 x 4,096, rank 64, T =
    # 4,096, one adapter: 58.6 -> 27.6 us), 0.99x-1.37x on the 12 with fewer. Expand tiles of
    # 64 tokens took 0.75x-1.15x on the 8 rank-64 rows with >= 64 tokens an adapter (6 faster;
    # 87.9 -> 66.2 us on that row) and 0.98x-1.32x on the rank-16 ones. In the whole grid (call 2,
    # against the twenty-fourth session's run) the 48 rows that took them ran 0.66x-1.16x
    # (geometric mean 0.953x); the slowest were T = 64 (one 64-token tile: 1.11x and 1.16x at
    # rank 64), hence ``large_tiles_min_batch``. None: never.
    large_tiles_min_tokens: int | None = 32  # tokens an adapter from which the shrink's are large
    large_tiles_min_batch: int = 256  # ... in batches of at least this many tokens
    large_shrink_block_tokens: int = 64
    large_shrink_block_k: int = 128
    large_expand_min_tokens: int | None = 64  # ... and the expand's, with mean rank >= below
    large_expand_min_rank: int = 64
    large_expand_block_tokens: int = 64

    def __post_init__(self):
        for name in ("deterministic", "expand_prefetch_y"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected a bool, got {getattr(self, name)!r}"
                )
        for name in (
            "shrink_block_tokens",
            "shrink_block_n",
            "expand_block_tokens",
            "expand_block_n",
            "large_shrink_block_tokens",
            "large_shrink_block_k",
            "large_expand_block_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_pow2(value) or value < 16:
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected a power of two >= 16 "
                    f"(a tensor-core dot dimension), got {value!r}"
                )
        for name in (
            "decode_block_k",
            "decode_expand_block_n",
            "decode_rank_chunk",
            "per_token_shrink_rows",
            "per_token_block_k",
            "per_token_expand_block_n",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_pow2(value):
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected a power of two, got {value!r}"
                )
        for name in (
            "decode_shrink_max_tokens",
            "decode_shrink_max_token_rows",
            "per_token_max_rows",
            "large_tiles_min_tokens",
            "large_expand_min_tokens",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected None or an int >= 0, got {value!r}"
                )
        if self.shrink_block_k is not None and (
            not isinstance(self.shrink_block_k, int)
            or not _is_pow2(self.shrink_block_k)
            or self.shrink_block_k < 16
        ):
            raise ConfigError(
                "SgmvConfig field 'shrink_block_k': expected None or a power of two >= 16 "
                f"(a tensor-core dot dimension), got {self.shrink_block_k!r}"
            )
        for name in ("shrink_split_k", "decode_shrink_rows", "expand_col_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not _is_pow2(value)):
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected None or a power of two, got {value!r}"
                )
        for name in (
            "decode_max_tokens",
            "shrink_small_tokens",
            "target_programs",
            "shrink_waves",
            "shrink_large_waves",
            "shrink_large_tokens",
            "expand_waves",
            "shrink_num_warps",
            "shrink_num_stages",
            "expand_num_warps",
            "expand_num_stages",
            "decode_shrink_num_warps",
            "decode_shrink_num_stages",
            "decode_expand_num_warps",
            "decode_expand_num_stages",
            "per_token_shrink_num_warps",
            "per_token_shrink_num_stages",
            "per_token_expand_num_warps",
            "per_token_expand_num_stages",
            "per_token_expand_tokens",
            "large_expand_min_rank",
            "large_tiles_min_batch",
        ):
            value = getattr(self, name)
            at_least = (
                0
                if name in ("decode_max_tokens", "shrink_small_tokens", "shrink_large_tokens")
                else 1
            )
            if not isinstance(value, int) or value < at_least:
                raise ConfigError(
                    f"SgmvConfig field {name!r}: expected an int >= {at_least}, got {value!r}"
                )

    def shrink_k_step(self, num_tokens: int) -> int:
        """The prefill shrink's input-width step at T tokens (before clipping to the width)."""
        if self.shrink_block_k is not None:
            return self.shrink_block_k
        return 64 if num_tokens <= self.shrink_small_tokens else 256

    def shrink_target(self, num_tokens: int) -> int:
        """The programs the prefill shrink's K split aims at for T tokens."""
        waves = (
            self.shrink_large_waves if num_tokens > self.shrink_large_tokens else self.shrink_waves
        )
        return waves * self.target_programs

    def regime(
        self,
        num_tokens: int,
        kernel: str = "expand",
        *,
        columns: int | None = None,
        per_token: bool = False,
    ) -> str:
        """ "decode" or "prefill" kernels for ``kernel`` ("shrink" or "expand") at T tokens;
        the shrink's choice also depends on its ``columns`` (G * MP * R, the v columns). With
        ``per_token``, "per_token" (the decode kernels with the ``per_token_*`` knobs) where it
        would be "prefill"."""
        regime = self._regime_by_size(num_tokens, kernel, columns)
        return "per_token" if per_token and regime == "prefill" else regime

    def _regime_by_size(self, num_tokens, kernel, columns):
        if kernel == "expand":
            return "decode" if num_tokens <= self.decode_max_tokens else "prefill"
        if kernel != "shrink":
            raise ConfigError(
                f"SgmvConfig.regime: kernel must be 'shrink' or 'expand', got {kernel!r}"
            )
        if not isinstance(columns, int) or columns < 1:
            raise ConfigError(
                f"SgmvConfig.regime: the shrink's columns must be an int >= 1, got {columns!r}"
            )
        limit = self.decode_max_tokens
        if self.decode_shrink_max_tokens is not None:
            limit = self.decode_shrink_max_tokens
        rows_limit = self.decode_shrink_max_token_rows
        per_token = num_tokens <= limit and (
            rows_limit is None or num_tokens * columns <= rows_limit
        )
        return "decode" if per_token else "prefill"


def _host_token_slot(fn: str, token_slot, num_slots: int | None = None) -> np.ndarray:
    """token_slot as a numpy array, checked: 1-D int, each NO_ADAPTER or a slot >= 0 (and below
    num_slots when given); AdapterError naming fn and the first bad entry otherwise."""
    token_slot = np.asarray(token_slot)
    if token_slot.ndim != 1 or not np.issubdtype(token_slot.dtype, np.integer):
        raise AdapterError(
            f"{fn}: token_slot must be a 1-D int array, got shape "
            f"{token_slot.shape} dtype {token_slot.dtype}"
        )
    bad = token_slot < NO_ADAPTER
    expected = "a slot >= 0"
    if num_slots is not None:
        bad |= token_slot >= num_slots
        expected = f"a slot in [0, {num_slots})"
    if bad.any():
        t = int(np.argmax(bad))
        raise AdapterError(
            f"{fn}: token_slot[{t}] = {int(token_slot[t])}; "
            f"expected {NO_ADAPTER} (no adapter) or {expected}"
        )
    return token_slot


def choose_per_token(
    token_slot: np.ndarray, ranks: np.ndarray, *, config: SgmvConfig | None = None
) -> bool:
    """Host-side choice of the ``per_token`` argument for a batch: its ``token_slot`` (T,) and
    the slots' ``ranks`` (S, 7) as numpy arrays. True when the tokens with an adapter per
    distinct adapter, times their adapters' mean rank (the largest of an adapter's weights), is
    at most ``config.per_token_max_rows``: adapters with about one token each, and small ranks.

    A caller holding the slots on the host passes the result to ``sgmv_apply`` /
    ``sgmv_delta`` (issue 3's benchmark) or ``sgmv_shrink`` (the engine's decode steps, whose
    shrink would otherwise be the tiles: ``Engine._per_token_can_apply``). A prompt is a run of
    one adapter's tokens, so prefill steps keep the tiles."""
    config = config or SgmvConfig()
    with_adapter, mean_rank = _tokens_and_mean_rank("choose_per_token", token_slot, ranks)
    if config.per_token_max_rows is None or with_adapter.size == 0:
        return False
    tokens_per_adapter = with_adapter.size / len(np.unique(with_adapter))
    return tokens_per_adapter * mean_rank <= config.per_token_max_rows


def _tokens_and_mean_rank(fn: str, token_slot, ranks) -> tuple[np.ndarray, float]:
    """The slots of the tokens with an adapter, and those tokens' mean rank (the largest of
    an adapter's weights); AdapterError naming ``fn`` for a bad ``token_slot`` or ``ranks``."""
    token_slot = _host_token_slot(fn, token_slot)
    ranks = np.asarray(ranks)
    if (
        ranks.ndim != 2
        or ranks.shape[1] != _NUM_WEIGHTS
        or token_slot.max(initial=-1) >= len(ranks)
    ):
        raise AdapterError(
            f"{fn}: ranks must be (S, {_NUM_WEIGHTS}) with a row for every slot in "
            f"token_slot (largest {int(token_slot.max(initial=-1))}), got shape {ranks.shape}"
        )
    with_adapter = token_slot[token_slot >= 0]
    if with_adapter.size == 0:
        return with_adapter, 0.0
    return with_adapter, float(np.mean(ranks.max(axis=1)[with_adapter]))


def choose_tiles(
    token_slot: np.ndarray, ranks: np.ndarray, *, config: SgmvConfig | None = None
) -> SgmvConfig:
    """Host-side choice of the prefill tile sizes for a batch: ``config`` (default
    ``SgmvConfig()``) with its shrink tiles set to ``large_shrink_block_tokens`` tokens (K
    steps of ``large_shrink_block_k``) when the tokens with an adapter per distinct adapter
    reach ``large_tiles_min_tokens``, and its expand tiles to ``large_expand_block_tokens`` when
    they also reach ``large_expand_min_tokens`` and the adapters' mean rank (the largest of an
    adapter's weights, per token) is at least ``large_expand_min_rank``; ``config`` unchanged
    otherwise, and for batches of fewer than ``large_tiles_min_batch`` tokens (a few large
    tiles leave SMs idle). ``token_slot`` (T,) and ``ranks`` (S, 7) as in ``choose_per_token``.

    The caller builds the batch's metadata (``build_sgmv_metadata``) and runs the kernels with
    the returned config: the tile sizes are static, so each choice compiles once. A batch run
    per token (``choose_per_token``) has no tiles to choose."""
    config = config or SgmvConfig()
    with_adapter, mean_rank = _tokens_and_mean_rank("choose_tiles", token_slot, ranks)
    if (
        config.large_tiles_min_tokens is None
        or with_adapter.size == 0
        or len(token_slot) < config.large_tiles_min_batch
    ):
        return config
    tokens_per_adapter = with_adapter.size / len(np.unique(with_adapter))
    if tokens_per_adapter < config.large_tiles_min_tokens:
        return config
    changes = {
        "shrink_block_tokens": config.large_shrink_block_tokens,
        "shrink_block_k": config.large_shrink_block_k,
    }
    if (
        config.large_expand_min_tokens is not None
        and tokens_per_adapter >= config.large_expand_min_tokens
        and mean_rank >= config.large_expand_min_rank
    ):
        changes["expand_block_tokens"] = config.large_expand_block_tokens
    return dataclasses.replace(config, **changes)


def num_tiles_bound(num_tokens: int, num_slots: int, block_tokens: int) -> int:
    """Static number of prefill tiles: enough for any assignment of T tokens to S slots."""
    if num_tokens == 0:
        return 0
    segments = min(num_tokens, num_slots + 1)
    return min(num_tokens, -(-num_tokens // block_tokens) + segments - 1)


# ------------------------------------------------------------------------------------------------
# Prefill metadata
# ------------------------------------------------------------------------------------------------


def build_sgmv_metadata(
    token_slot: np.ndarray, num_slots: int, *, config: SgmvConfig | None = None
) -> dict[str, np.ndarray]:
    """Host-side (numpy) prefill metadata for ``token_slot`` (T,) over ``num_slots`` slots."""
    config = config or SgmvConfig()
    token_slot = _host_token_slot("build_sgmv_metadata", token_slot, num_slots)
    t_count = token_slot.shape[0]
    key = np.where(token_slot < 0, num_slots, token_slot).astype(np.int64)
    meta = {"sorted_tokens": np.argsort(key, kind="stable").astype(np.int32)}
    counts = np.bincount(key, minlength=num_slots + 1)
    seg_start = np.cumsum(counts) - counts
    for kind, bt in (
        ("shrink", config.shrink_block_tokens),
        ("expand", config.expand_block_tokens),
    ):
        nt = num_tiles_bound(t_count, num_slots, bt)
        tile_start = np.zeros(nt, np.int32)
        tile_size = np.zeros(nt, np.int32)
        tile_slot = np.full(nt, NO_ADAPTER, np.int32)
        j = 0
        for s in np.flatnonzero(counts):
            for off in range(0, int(counts[s]), bt):
                tile_start[j] = seg_start[s] + off
                tile_size[j] = min(bt, int(counts[s]) - off)
                tile_slot[j] = s if s < num_slots else NO_ADAPTER
                j += 1
        meta.update(
            {
                f"{kind}_tile_start": tile_start,
                f"{kind}_tile_size": tile_size,
                f"{kind}_tile_slot": tile_slot,
                f"{kind}_num_tiles": np.array([j], np.int32),
            }
        )
    return meta


def build_sgmv_metadata_jnp(
    token_slot: jax.Array, num_slots: int, *, config: SgmvConfig | None = None
) -> dict[str, jax.Array]:
    """The same arrays as ``build_sgmv_metadata``, computed with jnp (usable inside jit)."""
    config = config or SgmvConfig()
    t_count = token_slot.shape[0]
    key = jnp.where(token_slot < 0, num_slots, token_slot).astype(jnp.int32)
    meta = {"sorted_tokens": jnp.argsort(key, stable=True).astype(jnp.int32)}
    counts = jnp.zeros(num_slots + 1, jnp.int32).at[key].add(1)
    seg_start = jnp.cumsum(counts) - counts
    for kind, bt in (
        ("shrink", config.shrink_block_tokens),
        ("expand", config.expand_block_tokens),
    ):
        nt = num_tiles_bound(t_count, num_slots, bt)
        seg_tiles = (counts + bt - 1) // bt
        seg_tiles_end = jnp.cumsum(seg_tiles)
        j = jnp.arange(nt, dtype=jnp.int32)
        seg = jnp.searchsorted(seg_tiles_end, j, side="right").astype(jnp.int32)
        used = seg <= num_slots
        seg = jnp.minimum(seg, num_slots)
        local = j - (seg_tiles_end[seg] - seg_tiles[seg])
        tile_start = jnp.where(used, seg_start[seg] + local * bt, 0)
        tile_size = jnp.where(used, jnp.clip(counts[seg] - local * bt, 0, bt), 0)
        tile_slot = jnp.where(used & (seg < num_slots), seg, NO_ADAPTER)
        meta.update(
            {
                f"{kind}_tile_start": tile_start.astype(jnp.int32),
                f"{kind}_tile_size": tile_size.astype(jnp.int32),
                f"{kind}_tile_slot": tile_slot.astype(jnp.int32),
                f"{kind}_num_tiles": seg_tiles_end[-1:].astype(jnp.int32),
            }
        )
    return meta


# ------------------------------------------------------------------------------------------------
# Kernel helpers
# ------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _idx(index, valid, bound, interpret):
    """Index of a masked load/store.

    Compiled Triton never touches masked-off addresses. The interpreter gathers every index
    (clamped) and scatters every index, masked ones included, so there a masked index is moved
    one past the end, where the scatter drops it.
    """
    if interpret:
        return jnp.where(valid, index, bound)
    return index


def _accumulate(ref, idx, value, mask, interpret):
    """ref[idx] += value where mask, atomically (split-K shrink programs share v entries)."""
    if interpret:
        # Programs run one after another in the interpreter; its atomic add has no mask.
        old = pltriton.load(ref.at[idx], mask=mask, other=0.0)
        pltriton.store(ref.at[idx], old + value, mask=mask)
    else:
        pltriton.atomic_add(ref, idx, value, mask=mask)


def _compute_dtype(*dtypes):
    """Operand dtype of the dots: a shared 16-bit float stays (tensor cores), anything else f32."""
    first = jnp.dtype(dtypes[0])
    if all(jnp.dtype(d) == first for d in dtypes) and first.itemsize == 2:
        return first
    return jnp.dtype(jnp.float32)


def _dot_precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _weight_of_column(g_index, weights):
    """Weight index (0..6) of each column, from its group position g (static table)."""
    w = jnp.full(g_index.shape, weights[0], jnp.int32)
    for g in range(1, len(weights)):
        w = jnp.where(g_index >= g, weights[g], w)
    return w


def _layer(layer_ref, pool_ref, pages_per_pool, rows_per_page):
    """The traced layer, clamped into the pool (inside the kernel: no extra launch)."""
    num_layers = pool_ref.shape[0] // (pages_per_pool * rows_per_page)
    return jnp.clip(layer_ref[0], 0, num_layers - 1)


def _pool_rows(pages_ref, slot, w, i, layer, *, pages_per_pool, rows_per_page, max_pages):
    """Pool row (in the (L*P*R, W) view) of rank-row i of weight w of the slot; shapes of i."""
    page_idx = jnp.minimum(i // rows_per_page, max_pages - 1)
    page = jnp.clip(pages_ref[slot, w, page_idx], 0, pages_per_pool - 1)
    return (layer * pages_per_pool + page) * rows_per_page + i % rows_per_page


def _compiler_params(num_warps, num_stages):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------------------------
# Input checks (static shapes; a bad call names the tensor and the expected shape)
# ------------------------------------------------------------------------------------------------

_WHERE = "pallas_kernels/sgmv.py"


def _check_weights(fn, weights, where=_WHERE):
    if (
        not isinstance(weights, tuple)
        or not weights
        or any(not isinstance(w, int) or not 0 <= w < _NUM_WEIGHTS for w in weights)
    ):
        raise ConfigError(
            f"{where} {fn}: weights must be a non-empty tuple of weight indices "
            f"in [0, {_NUM_WEIGHTS}), got {weights!r}"
        )


def _check_pool(fn, name, pool, where=_WHERE):
    if pool.ndim != 4:
        raise ConfigError(f"{where} {fn}: {name} must be (L, P, R, W), got shape {pool.shape}")


def _check_slot_tables(
    fn, pages_name, pages, ranks, token_slot, num_tokens, scales=None, where=_WHERE
):
    if pages.ndim != 3 or pages.shape[1] != _NUM_WEIGHTS:
        raise ConfigError(
            f"{where} {fn}: {pages_name} must be (S, {_NUM_WEIGHTS}, MP), got shape {pages.shape}"
        )
    s = pages.shape[0]
    if ranks.shape != (s, _NUM_WEIGHTS):
        raise ConfigError(
            f"{where} {fn}: ranks must be (S, {_NUM_WEIGHTS}) = "
            f"{(s, _NUM_WEIGHTS)}, got shape {ranks.shape}"
        )
    if scales is not None and scales.shape != (s, _NUM_WEIGHTS):
        raise ConfigError(
            f"{where} {fn}: scales must be (S, {_NUM_WEIGHTS}) = "
            f"{(s, _NUM_WEIGHTS)}, got shape {scales.shape}"
        )
    if token_slot.shape != (num_tokens,):
        raise ConfigError(
            f"{where} {fn}: token_slot must be (T,) = ({num_tokens},), got shape {token_slot.shape}"
        )
    for name, arr in ((pages_name, pages), ("ranks", ranks), ("token_slot", token_slot)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ConfigError(f"{where} {fn}: {name} must be int32, got {arr.dtype}")


def check_fused_shrink_operands(
    fn,
    a_pool,
    a_pages,
    ranks,
    token_slot,
    weights,
    *,
    num_tokens,
    width,
    expected,
    where,
    num_layers=None,
):
    """The operands of a LoRA shrink that runs in the launch computing its input
    (pallas_kernels.residual_norm, .swiglu, .paged_attention): the weights, an A pool of
    ``width`` columns (and ``num_layers`` layers, where given; ``expected`` says why) and the
    slot tables of ``num_tokens`` tokens. Raises ConfigError naming the field."""
    _check_weights(fn, weights, where=where)
    _check_pool(fn, "a_pool", a_pool, where=where)
    layers = "L" if num_layers is None else num_layers
    if a_pool.shape[3] != width or (num_layers is not None and a_pool.shape[0] != num_layers):
        raise ConfigError(
            f"{where} {fn}: a_pool must be ({layers}, P, R, {width}) ({expected}), got shape "
            f"{a_pool.shape}"
        )
    _check_slot_tables(fn, "a_pages", a_pages, ranks, token_slot, num_tokens, where=where)


def _check_b_pools(fn, weights, b_pools, *, prefix="", where=_WHERE):
    """The group's B pools as a tuple (one per weight, (L, P, R, out_g), equal L and R) and
    their widths."""
    _check_weights(fn, weights, where)
    b_pools = tuple(b_pools)
    g_count = len(weights)
    if len(b_pools) != g_count:
        raise ConfigError(
            f"{where} {fn}: {prefix}b_pools must hold one pool per weight of the group "
            f"({g_count}), got {len(b_pools)}"
        )
    for g, pool in enumerate(b_pools):
        _check_pool(fn, f"{prefix}b_pools[{g}]", pool, where)
    num_layers, _, rows_per_page, _ = b_pools[0].shape
    for g, pool in enumerate(b_pools):
        if pool.shape[0] != num_layers or pool.shape[2] != rows_per_page:
            raise ConfigError(
                f"{where} {fn}: {prefix}b_pools[{g}] has shape {pool.shape}; expected "
                f"L={num_layers} layers and R={rows_per_page} rows per page like "
                f"{prefix}b_pools[0]"
            )
    return b_pools, tuple(int(p.shape[3]) for p in b_pools)


def _check_expand_tables(
    fn, v, b_pools, b_pages, ranks, scales, token_slot, num_tokens, *, prefix="", where=_WHERE
):
    """The slot tables and v (T, G, MP*R) of an expand (None: not given); returns MP*R (v's
    columns per weight)."""
    _check_slot_tables(
        fn, f"{prefix}b_pages", b_pages, ranks, token_slot, num_tokens, scales, where
    )
    rank_cols = b_pages.shape[2] * b_pools[0].shape[2]
    expected = (num_tokens, len(b_pools), rank_cols)
    if v is not None and v.shape != expected:
        raise ConfigError(
            f"{where} {fn}: {prefix}v must be (T, G, MP*R) = {expected}, got shape {v.shape}"
        )
    return rank_cols


def _check_meta(fn, meta, num_tokens, num_slots, config):
    expected = {"sorted_tokens": (num_tokens,)}
    for kind, bt in (
        ("shrink", config.shrink_block_tokens),
        ("expand", config.expand_block_tokens),
    ):
        nt = num_tiles_bound(num_tokens, num_slots, bt)
        expected.update({f"{kind}_tile_{f}": (nt,) for f in _TILE_FIELDS})
        expected[f"{kind}_num_tiles"] = (1,)
    if set(meta) != set(_META_KEYS):
        raise ConfigError(
            f"{_WHERE} {fn}: kernel_meta must have the keys {list(_META_KEYS)} "
            f"(build_sgmv_metadata), got {sorted(meta)}"
        )
    for key, shape in expected.items():
        if tuple(meta[key].shape) != shape:
            raise ConfigError(
                f"{_WHERE} {fn}: kernel_meta[{key!r}] must have shape {shape} "
                f"(T={num_tokens}, S={num_slots}, shrink_block_tokens="
                f"{config.shrink_block_tokens}, expand_block_tokens="
                f"{config.expand_block_tokens}), got {tuple(meta[key].shape)}"
            )


def _prefill_meta(fn, kind, kernel_meta, token_slot, num_slots, config):
    """sorted_tokens and the (start, size, slot) tile arrays of one kernel kind."""
    if kernel_meta is None:
        meta = build_sgmv_metadata_jnp(token_slot, num_slots, config=config)
    else:
        _check_meta(fn, kernel_meta, token_slot.shape[0], num_slots, config)
        meta = kernel_meta
    keys = ("sorted_tokens", *(f"{kind}_tile_{f}" for f in _TILE_FIELDS), f"{kind}_num_tiles")
    return [jnp.asarray(meta[k], jnp.int32) for k in keys]


# ------------------------------------------------------------------------------------------------
# shrink
# ------------------------------------------------------------------------------------------------


def _shrink_max_split(config, num_tokens, n_blocks, k_blocks, target):
    """The largest split of the input width a launch may use: what the fewest tiles T can make
    (one slot) need for ``target`` programs (``config.shrink_target(T)``, the same target the
    kernel's run-time split aims at), each split keeping at least two K blocks (it doubles while
    a split holds four or more). The split actually used is chosen in the kernel from the
    number of tiles in use (``_shrink_split``), so that a batch of many adapters (many tiles) is
    not cut into tiny programs."""
    if config.shrink_split_k is not None:
        return min(config.shrink_split_k, _next_pow2(k_blocks))
    programs = _cdiv(num_tokens, config.shrink_block_tokens) * n_blocks
    split = 1
    while programs * split < target and split * 4 <= k_blocks:
        split *= 2
    return split


def _shrink_split(used, n_blocks, max_split, target, where):
    """The K split for ``used`` tiles in use: the smallest power of two up to ``max_split`` that
    gives ``target`` programs (split c is needed while c / 2 leaves programs short of it).

    One rule for the kernel (``where=jnp.where`` on the traced tile count) and for the launch
    (``where=np.where`` over every possible count, to size the grid)."""
    # Typed int32 constants: the Triton lowering mistypes selects between weak-typed literals.
    split = np.int32(1)
    for c in (1 << i for i in range(1, max_split.bit_length())):
        split = where(used * (n_blocks * (c // 2)) < target, np.int32(c), split)
    return split


def _expand_run_choice(used, col_programs, target, where):
    """Index into the column-run choices for ``used`` tiles in use: the longest run whose column
    programs still give ``target`` programs (the first, one block, when none does). Shared by the
    kernel and the launch like ``_shrink_split``."""
    choice = np.int32(0)
    for i in range(1, len(col_programs)):
        choice = where(used * col_programs[i][-1] >= target, np.int32(i), choice)
    return choice


def _lookup(table, index):
    """``table[index]`` for a traced index (a static table, a chain of selects)."""
    value = jnp.int32(table[0])
    for i in range(1, len(table)):
        value = jnp.where(index == i, jnp.int32(table[i]), value)
    return value


def _expand_col_steps(config, blocks_per_weight):
    """The most column blocks an expand program may walk (a pipelined loop over B and y); the
    number actually walked is chosen in the kernel from the tiles in use."""
    if config.expand_col_steps is not None:
        return min(config.expand_col_steps, _next_pow2(max(blocks_per_weight)))
    steps = 1
    while steps < 8 and steps * 2 <= min(blocks_per_weight):
        steps *= 2
    return steps


def _decode_shrink_rows(config, num_tokens, columns):
    """Rank rows per decode shrink program: the most that still gives every SM work."""
    if config.decode_shrink_rows is not None:
        return min(config.decode_shrink_rows, _next_pow2(columns))
    rows = min(8, _next_pow2(columns))
    while rows > 1 and num_tokens * _cdiv(columns, rows) < 4 * config.target_programs:
        rows //= 2
    return rows


def token_rank_rows(
    n,
    slot,
    layer_ref,
    pool_ref,
    pages_ref,
    ranks_ref,
    *,
    weights,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    interpret,
):
    """Inside a kernel, rank rows ``n`` (a vector of the group's v columns) of one token's
    slot: (in the group, live (a row of the adapter's rank), the A rows' index in the
    (L*P*R, in) pool view, the v columns' index). The decode shrink and
    ``pallas_kernels.residual_norm.residual_rms_norm_shrink`` read A through it."""
    columns = len(weights) * rank_cols
    col_ok = n < columns
    c = n % rank_cols
    w = _weight_of_column(n // rank_cols, weights)
    slot_c = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, ranks_ref[slot_c, w], 0)
    live = col_ok & (c < rank)
    layer = _layer(layer_ref, pool_ref, pages_per_pool, rows_per_page)
    a_row = _pool_rows(
        pages_ref,
        slot_c,
        w,
        c,
        layer,
        pages_per_pool=pages_per_pool,
        rows_per_page=rows_per_page,
        max_pages=max_pages,
    )
    a_i = _idx(a_row, live, pool_ref.shape[0], interpret)
    return col_ok, live, a_i, _idx(n, col_ok, columns, interpret)


def rank_row_statics(a_pool, a_pages, weights, interpret) -> dict:
    """``token_rank_rows``' static arguments for an A pool (L, P, R, in) and its page table."""
    _, pages_per_pool, rows_per_page, _ = a_pool.shape
    max_pages = int(a_pages.shape[2])
    return dict(
        weights=tuple(weights),
        rank_cols=max_pages * rows_per_page,
        pages_per_pool=int(pages_per_pool),
        rows_per_page=int(rows_per_page),
        max_pages=max_pages,
        interpret=interpret,
    )


def chunk_rank_rows(rows, slot_ref, layer_ref, pool_ref, pages_ref, ranks_ref, rank_rows):
    """In a kernel of grid (tokens, chunks of ``rows`` rank rows) that runs a group's shrink in
    the launch computing its input (``pallas_kernels.residual_norm``, ``pallas_kernels.swiglu``):
    (the token row, the chunk, then ``token_rank_rows`` of the chunk's rows (``rank_rows``: its
    statics, ``rank_row_statics``), and whether any of them is live)."""
    row, chunk = pl.program_id(0), pl.program_id(1)
    col_ok, live, a_i, out_i = token_rank_rows(
        chunk * rows + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0),
        slot_ref[row],
        layer_ref,
        pool_ref,
        pages_ref,
        ranks_ref,
        **rank_rows,
    )
    return row, chunk, col_ok, live, a_i, out_i, jnp.sum(live.astype(jnp.int32)) > 0


def _prefill_shrink_kernel(
    # inputs
    x_ref,  # (T, in) activations
    pool_ref,  # (L*P*R, in) A rank-rows of every layer and page
    pages_ref,  # (S, 7, MP) int32 page ids of each slot's weights
    ranks_ref,  # (S, 7) int32
    layer_ref,  # (1,) int32
    order_ref,  # (T,) int32 tokens sorted by slot
    start_ref,  # (NT,) int32 first sorted position of each tile
    size_ref,  # (NT,) int32 tokens in each tile (0: unused tile)
    tslot_ref,  # (NT,) int32 slot of each tile
    used_ref,  # (1,) int32 tiles in use (they come first)
    *rest,  # [(T, G*MP*R) float32 zeros aliased to v_ref: atomic adds, max_split > 1]
    # outputs: rest[-1] = v_ref (T, G*MP*R) float32; with partials, (max_split*T, G*MP*R):
    # rows [k*T, (k+1)*T) are split k's partial sums
    weights,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    bt,
    bn,
    bk,
    n_blocks,
    k_blocks,
    max_split,
    target,
    partials,
    dtype,
    interpret,
):
    v_ref = rest[-1]
    num_tokens, width = x_ref.shape
    used = used_ref[0]
    # Work items (tile, column block, K split) are numbered flat over the programs; the split
    # grows only while the tiles in use leave SMs idle.
    split = _shrink_split(used, n_blocks, max_split, target, jnp.where)
    item = pl.program_id(0)
    per_tile = n_blocks * split
    tile = item // per_tile
    rest_ = item - tile * per_tile
    nb = rest_ % n_blocks
    ks = rest_ // n_blocks

    @pl.when(tile < used)
    def _tile():
        size = size_ref[tile]
        slot = tslot_ref[tile]
        start = start_ref[tile]
        i = jnp.arange(bt, dtype=jnp.int32)
        row_ok = i < size
        tok = pltriton.load(
            order_ref.at[_idx(start + i, row_ok, num_tokens, interpret)], mask=row_ok, other=0
        )
        col_ok, live, a_i, out_i = token_rank_rows(
            nb * bn + jnp.arange(bn, dtype=jnp.int32),
            slot,
            layer_ref,
            pool_ref,
            pages_ref,
            ranks_ref,
            weights=weights,
            rank_cols=rank_cols,
            pages_per_pool=pages_per_pool,
            rows_per_page=rows_per_page,
            max_pages=max_pages,
            interpret=interpret,
        )
        tok_i = _idx(tok, row_ok, num_tokens, interpret)[:, None]
        a_i = a_i[:, None]
        out_mask = row_ok[:, None] & col_ok[None, :]
        out_idx = (tok_i, out_i[None, :])
        any_live = jnp.sum(live.astype(jnp.int32)) > 0
        # Where a program stores its sums whole: v itself (no split), or its split's rows of the
        # partials; None with atomic adds into v.
        store_idx = out_idx if max_split == 1 else None
        if partials:
            part_row = _idx(ks * num_tokens + tok, row_ok, v_ref.shape[0], interpret)
            store_idx = (part_row[:, None], out_idx[1])

        @pl.when(any_live)
        def _compute():
            def body(kb, acc):
                k = pl.multiple_of(kb * bk, bk) + jnp.arange(bk, dtype=jnp.int32)
                if width % bk:
                    k_ok = k < width
                    k_i = _idx(k, k_ok, width, interpret)[None, :]
                    x_mask = row_ok[:, None] & k_ok[None, :]
                    a_mask = live[:, None] & k_ok[None, :]
                else:
                    k_i = k[None, :]
                    x_mask, a_mask = row_ok[:, None], live[:, None]
                xt = pltriton.load(x_ref.at[tok_i, k_i], mask=x_mask, other=0).astype(dtype)
                at = pltriton.load(pool_ref.at[a_i, k_i], mask=a_mask, other=0).astype(dtype)
                return acc + pltriton.dot(xt, at, trans_b=True, precision=_dot_precision(dtype))

            k_per_split = (k_blocks + split - 1) // split
            lo = ks * k_per_split
            hi = jnp.minimum(lo + k_per_split, k_blocks)
            acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((bt, bn), jnp.float32))
            if store_idx is not None:
                pltriton.store(v_ref.at[store_idx], acc, mask=out_mask)
            else:

                @pl.when(split == 1)
                def _store():
                    pltriton.store(v_ref.at[out_idx], acc, mask=out_mask)

                @pl.when(split > 1)
                def _add():
                    _accumulate(v_ref, out_idx, acc, out_mask, interpret)

        if store_idx is not None:
            # Every entry of v (or of each split's partials, all summed) is written by exactly
            # one program: dead columns and base-only tiles write their zeros here (with atomic
            # adds, v starts zeroed instead).
            @pl.when(jnp.logical_not(any_live))
            def _zeros():
                pltriton.store(v_ref.at[store_idx], jnp.zeros((bt, bn), jnp.float32), mask=out_mask)


def _decode_shrink_kernel(
    # inputs
    x_ref,  # (T, in) activations
    pool_ref,  # (L*P*R, in) A rank-rows of every layer and page
    pages_ref,  # (S, 7, MP) int32
    ranks_ref,  # (S, 7) int32
    layer_ref,  # (1,) int32
    slot_ref,  # (T,) int32 each token's slot, -1 = no adapter
    # outputs
    v_ref,  # (T, G*MP*R) float32
    *,
    weights,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    rows,
    bk,
    interpret,
):
    _, width = x_ref.shape
    t = pl.program_id(1)
    col_ok, live, a_i, out_i = token_rank_rows(
        pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32),
        slot_ref[t],
        layer_ref,
        pool_ref,
        pages_ref,
        ranks_ref,
        weights=weights,
        rank_cols=rank_cols,
        pages_per_pool=pages_per_pool,
        rows_per_page=rows_per_page,
        max_pages=max_pages,
        interpret=interpret,
    )
    a_i = a_i[:, None]
    any_live = jnp.sum(live.astype(jnp.int32)) > 0

    @pl.when(any_live)
    def _compute():
        def body(kb, acc):
            k = pl.multiple_of(kb * bk, bk) + jnp.arange(bk, dtype=jnp.int32)
            if width % bk:
                k_ok = k < width
                k_i = _idx(k, k_ok, width, interpret)
                xk = pltriton.load(x_ref.at[t, k_i], mask=k_ok, other=0)
                at = pltriton.load(
                    pool_ref.at[a_i, k_i[None, :]], mask=live[:, None] & k_ok[None, :], other=0
                )
            else:
                xk = x_ref[t, k]
                at = pltriton.load(pool_ref.at[a_i, k[None, :]], mask=live[:, None], other=0)
            return acc + at.astype(jnp.float32) * xk.astype(jnp.float32)[None, :]

        acc = jax.lax.fori_loop(0, _cdiv(width, bk), body, jnp.zeros((rows, bk), jnp.float32))
        pltriton.store(v_ref.at[t, out_i], jnp.sum(acc, axis=1), mask=col_ok)

    @pl.when(jnp.logical_not(any_live))
    def _zeros():
        pltriton.store(v_ref.at[t, out_i], jnp.zeros((rows,), jnp.float32), mask=col_ok)


def sgmv_shrink(
    # inputs
    x: jax.Array,  # (T, in)
    a_pool: jax.Array,  # (L, P, R, in)
    a_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
    kernel_meta: dict | None = None,
    config: SgmvConfig | None = None,
    per_token: bool = False,
    interpret: bool = False,
) -> jax.Array:  # (T, G, MP*R) float32
    """Pallas Triton shrink; same contract as ``sgmv_shrink_reference``. ``per_token`` (static;
    ``choose_per_token`` decides it on the host) runs one program per (token, rank rows) at any
    T instead of tiles of one slot's tokens."""
    config = config or SgmvConfig()
    fn = "sgmv_shrink"
    _check_weights(fn, weights)
    _check_pool(fn, "a_pool", a_pool)
    if x.ndim != 2 or x.shape[1] != a_pool.shape[3]:
        raise ConfigError(
            f"{_WHERE} {fn}: x must be (T, {a_pool.shape[3]}) (a_pool's width), got shape {x.shape}"
        )
    num_tokens, width = x.shape
    _check_slot_tables(fn, "a_pages", a_pages, ranks, token_slot, num_tokens)
    num_layers, pages_per_pool, rows_per_page, _ = a_pool.shape
    num_slots, _, max_pages = a_pages.shape
    g_count = len(weights)
    rank_cols = max_pages * rows_per_page
    columns = g_count * rank_cols
    if num_tokens == 0:
        return jnp.zeros((0, g_count, rank_cols), jnp.float32)
    pool_rows = a_pool.reshape(num_layers * pages_per_pool * rows_per_page, width)
    layer1 = jnp.asarray(layer, jnp.int32).reshape(1)
    a_pages = a_pages.astype(jnp.int32)
    ranks = ranks.astype(jnp.int32)
    token_slot = token_slot.astype(jnp.int32)
    statics = rank_row_statics(a_pool, a_pages, weights, interpret)
    out_shape = jax.ShapeDtypeStruct((num_tokens, columns), jnp.float32)

    regime = config.regime(num_tokens, "shrink", columns=columns, per_token=per_token)
    if regime != "prefill":
        if regime == "decode":
            rows = _decode_shrink_rows(config, num_tokens, columns)
            bk = min(config.decode_block_k, _next_pow2(width))
            warps, stages = config.decode_shrink_num_warps, config.decode_shrink_num_stages
        else:
            rows = min(config.per_token_shrink_rows, _next_pow2(columns))
            bk = min(config.per_token_block_k, _next_pow2(width))
            warps, stages = config.per_token_shrink_num_warps, config.per_token_shrink_num_stages
        v = pl.pallas_call(
            functools.partial(_decode_shrink_kernel, rows=rows, bk=bk, **statics),
            out_shape=out_shape,
            grid=(_cdiv(columns, rows), num_tokens),
            compiler_params=_compiler_params(warps, stages),
            interpret=interpret,
            name=f"sgmv_shrink_{regime}_rows{rows}_bk{bk}_w{warps}_s{stages}",
        )(x, pool_rows, a_pages, ranks, layer1, token_slot)
        return v.reshape(num_tokens, g_count, rank_cols)

    meta = _prefill_meta(fn, "shrink", kernel_meta, token_slot, num_slots, config)
    num_tiles = meta[1].shape[0]
    bt = config.shrink_block_tokens
    bn = max(16, min(config.shrink_block_n, _next_pow2(columns)))
    bk = max(16, min(config.shrink_k_step(num_tokens), _next_pow2(width)))
    n_blocks = _cdiv(columns, bn)
    k_blocks = _cdiv(width, bk)
    target = config.shrink_target(num_tokens)
    max_split = _shrink_max_split(config, num_tokens, n_blocks, k_blocks, target)
    used = np.arange(1, num_tiles + 1)
    programs = int(
        np.max(used * n_blocks * _shrink_split(used, n_blocks, max_split, target, np.where))
    )
    dtype = _compute_dtype(x.dtype, a_pool.dtype)
    partials = max_split > 1 and config.deterministic
    name = (
        f"sgmv_shrink_prefill_bt{bt}_bn{bn}_bk{bk}_ks{max_split}{'p' if partials else ''}"
        f"_w{config.shrink_num_warps}_s{config.shrink_num_stages}"
    )
    kernel = functools.partial(
        _prefill_shrink_kernel,
        bt=bt,
        bn=bn,
        bk=bk,
        n_blocks=n_blocks,
        k_blocks=k_blocks,
        max_split=max_split,
        target=target,
        partials=partials,
        dtype=dtype,
        **statics,
    )
    args = [x, pool_rows, a_pages, ranks, layer1, *meta]
    aliases = {}
    if partials:  # rows [k*T, (k+1)*T): split k's sums; those of unused splits never written
        out_shape = jax.ShapeDtypeStruct((max_split * num_tokens, columns), jnp.float32)
    elif max_split > 1:  # atomic adds into zeros
        args.append(jnp.zeros((num_tokens, columns), jnp.float32))
        aliases = {len(args) - 1: 0}
    v = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(programs,),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(config.shrink_num_warps, config.shrink_num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if partials:
        parts = v.reshape(max_split, num_tokens, columns)
        split = _shrink_split(meta[-1][0], n_blocks, max_split, target, jnp.where)
        v = parts[0]
        for k in range(1, max_split):  # one fixed order of float additions
            v = v + jnp.where(k < split, parts[k], 0.0)  # splits the kernel did not use
    return v.reshape(num_tokens, g_count, rank_cols)


# ------------------------------------------------------------------------------------------------
# expand
# ------------------------------------------------------------------------------------------------


def _group_of_block(block, block_starts):
    """Static per-group column-block ranges: yields (g, block index inside group g, condition)."""
    for g in range(len(block_starts) - 1):
        lo, hi = block_starts[g], block_starts[g + 1]
        yield g, block - lo, (block >= lo) & (block < hi)


def _expand_operands(refs, accumulate, g_count):
    """(v_ref, the G B-pool refs, the refs after them) of an expand kernel's refs; when
    accumulating, the leading y input is dropped (it is aliased to the output)."""
    if accumulate:
        refs = refs[1:]
    return refs[0], refs[1 : 1 + g_count], refs[1 + g_count :]


def _weight_rank(ranks_ref, slot, slot_c, w, accumulate):
    """The rank of weight w for a program's slot. Accumulating programs run only for slot >= 0;
    delta programs also run for NO_ADAPTER tokens, which see rank 0 (and store zeros)."""
    if accumulate:
        return ranks_ref[slot_c, w]
    return jnp.where(slot >= 0, ranks_ref[slot_c, w], 0)


def _prefill_expand_kernel(
    # inputs
    *refs,
    # [y_in (T, sum of out widths), the base output aliased to y_ref: only when accumulate]
    # v (T, G*MP*R) float32 from shrink
    # G B pools, (L*P_g*R, out_g) each
    # pages (S, 7, MP), ranks (S, 7), scales (S, 7) float32, layer (1,), sorted tokens (T,),
    # tile starts / sizes / slots (NT,) each, tiles in use (1,), all int32 but scales
    # outputs: refs[-1] = y_ref (T, sum of out widths): y += delta when accumulate, else the
    # float32 delta itself, written for every token (zeros where there is no adapter)
    accumulate,
    weights,
    widths,
    col_offsets,
    blocks,
    step_choices,
    col_programs,
    target,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    bt,
    bn,
    rank_pad,
    dtypes,
    prefetch_y,
    interpret,
):
    g_count = len(weights)
    v_ref, pool_refs, rest = _expand_operands(refs, accumulate, g_count)
    (
        pages_ref,
        ranks_ref,
        scales_ref,
        layer_ref,
        order_ref,
        start_ref,
        size_ref,
        tslot_ref,
        used_ref,
        y_ref,
    ) = rest
    num_tokens, y_cols = y_ref.shape
    v_cols = v_ref.shape[1]
    used = used_ref[0]
    # Column blocks walked per program: the longest runs that still give every SM programs,
    # from the tiles in use (few tiles: one block per program; many: long pipelined runs).
    choice = _expand_run_choice(used, col_programs, target, jnp.where)
    steps = _lookup(step_choices, choice)
    starts = [_lookup([cp[g] for cp in col_programs], choice) for g in range(g_count + 1)]
    item = pl.program_id(0)
    tile = item // starts[-1]
    prog_all = item - tile * starts[-1]

    @pl.when(tile < used)
    def _tile():
        size = size_ref[tile]
        slot = tslot_ref[tile]
        slot_c = jnp.maximum(slot, 0)
        for g in range(g_count):
            w = weights[g]
            pool_ref = pool_refs[g]
            width = widths[g]
            dtype = dtypes[g]
            in_group = (prog_all >= starts[g]) & (prog_all < starts[g + 1])

            # Accumulating, base-only tiles and rank-0 weights leave y alone; writing the delta,
            # they run the same loop with every adapter load masked off and store zeros.
            @pl.when(in_group & (slot >= 0) if accumulate else in_group)
            def _group(g=g, w=w, pool_ref=pool_ref, width=width, dtype=dtype):
                rank = _weight_rank(ranks_ref, slot, slot_c, w, accumulate)

                @pl.when((rank > 0) if accumulate else True)
                def _compute():
                    start = start_ref[tile]
                    scale = scales_ref[slot_c, w]
                    i = jnp.arange(bt, dtype=jnp.int32)
                    row_ok = i < size
                    tok = pltriton.load(
                        order_ref.at[_idx(start + i, row_ok, num_tokens, interpret)],
                        mask=row_ok,
                        other=0,
                    )
                    tok_i = _idx(tok, row_ok, num_tokens, interpret)[:, None]
                    layer = _layer(layer_ref, pool_ref, pages_per_pool[g], rows_per_page)
                    # The tile's v (all its rank columns) once; rows beyond the rank are masked
                    # so that v may carry garbage there and B rows of other adapters are never
                    # read.
                    j = jnp.arange(rank_pad, dtype=jnp.int32)
                    j_ok = j < rank
                    b_row = _pool_rows(
                        pages_ref,
                        slot_c,
                        w,
                        j,
                        layer,
                        pages_per_pool=pages_per_pool[g],
                        rows_per_page=rows_per_page,
                        max_pages=max_pages,
                    )
                    b_i = _idx(b_row, j_ok, pool_ref.shape[0], interpret)[:, None]
                    v_i = _idx(g * rank_cols + j, j_ok, v_cols, interpret)[None, :]
                    vt = pltriton.load(
                        v_ref.at[tok_i, v_i], mask=row_ok[:, None] & j_ok[None, :], other=0.0
                    ).astype(dtype)
                    first = (prog_all - starts[g]) * steps
                    num_steps = jnp.minimum(steps, blocks[g] - first)
                    ragged = width % bn != 0

                    def columns(step):
                        return pl.multiple_of((first + step) * bn, bn) + jnp.arange(
                            bn, dtype=jnp.int32
                        )

                    def y_tile(step):
                        # The prefetch after a run's last step loads nothing: its columns lie
                        # past the run (and may lie past y's last column).
                        cols = columns(step)
                        col_ok = cols < jnp.minimum((first + num_steps) * bn, width)
                        y_c = _idx(col_offsets[g] + cols, col_ok, y_cols, interpret)[None, :]
                        mask = row_ok[:, None] & col_ok[None, :]
                        return pltriton.load(y_ref.at[tok_i, y_c], mask=mask, other=0)

                    def step_operands(step):
                        """(B tile, y's column index, y's mask) of a column step."""
                        cols = columns(step)
                        if ragged:
                            col_ok = cols < width
                            cols_i = _idx(cols, col_ok, width, interpret)[None, :]
                            b_mask = j_ok[:, None] & col_ok[None, :]
                            y_mask = row_ok[:, None] & col_ok[None, :]
                            y_c = _idx(col_offsets[g] + cols, col_ok, y_cols, interpret)[None, :]
                        else:
                            cols_i = cols[None, :]
                            b_mask, y_mask = j_ok[:, None], row_ok[:, None]
                            y_c = (col_offsets[g] + cols)[None, :]
                        bt_ = pltriton.load(pool_ref.at[b_i, cols_i], mask=b_mask, other=0).astype(
                            dtype
                        )
                        return bt_, y_c, y_mask

                    def prefetching(step, yt):
                        bt_, y_c, y_mask = step_operands(step)
                        y_next = y_tile(step + 1)
                        delta = pltriton.dot(vt, bt_, precision=_dot_precision(dtype))
                        out = (yt.astype(jnp.float32) + delta * scale).astype(y_ref.dtype)
                        pltriton.store(y_ref.at[tok_i, y_c], out, mask=y_mask)
                        return y_next

                    if prefetch_y:
                        jax.lax.fori_loop(0, num_steps, prefetching, y_tile(0))
                        return

                    def body(step, carry):
                        bt_, y_c, y_mask = step_operands(step)
                        if accumulate:  # y's load issued before the dot, as before the delta form
                            yt = pltriton.load(y_ref.at[tok_i, y_c], mask=y_mask, other=0)
                        delta = pltriton.dot(vt, bt_, precision=_dot_precision(dtype))
                        if accumulate:
                            out = (yt.astype(jnp.float32) + delta * scale).astype(y_ref.dtype)
                        else:
                            out = jnp.where(rank > 0, delta * scale, 0.0)
                        pltriton.store(y_ref.at[tok_i, y_c], out, mask=y_mask)
                        return carry

                    jax.lax.fori_loop(0, num_steps, body, 0)


def _column_block(cb, bn, width, col_offset, y_cols, interpret):
    """Column block cb (bn wide) of a weight ``width`` wide whose y columns start at
    col_offset: which columns are inside it, their B-pool column index (1, bn) and y index."""
    cols = pl.multiple_of(cb * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
    col_ok = cols < width
    cols_i = _idx(cols, col_ok, width, interpret)[None, :]
    return col_ok, cols_i, _idx(col_offset + cols, col_ok, y_cols, interpret)


def _rank_chunk_sum(v_ref, pool_ref, t, g, j, j_ok, b_row, cols_i, col_ok, rank_cols, interpret):
    """Token t's sum over the rank rows j (those with j_ok) of v[t, g, j] times B's rows b_row
    at the columns cols_i (col_ok: those inside the weight; None: all): (bn,) float32."""
    b_i = _idx(b_row, j_ok, pool_ref.shape[0], interpret)[:, None]
    vj = pltriton.load(
        v_ref.at[t, _idx(g * rank_cols + j, j_ok, v_ref.shape[1], interpret)],
        mask=j_ok,
        other=0.0,
    )
    b_mask = j_ok[:, None] if col_ok is None else j_ok[:, None] & col_ok[None, :]
    bj = pltriton.load(pool_ref.at[b_i, cols_i], mask=b_mask, other=0)
    return jnp.sum(vj[:, None] * bj.astype(jnp.float32), axis=0)


def _decode_expand_kernel(
    # inputs
    *refs,
    # [y_in (T, sum of out widths), the base output aliased to y_ref: only when accumulate]
    # v (T, G*MP*R) float32 from shrink
    # G B pools, (L*P_g*R, out_g) each
    # pages (S, 7, MP) int32, ranks (S, 7) int32, scales (S, 7) float32, layer (1,) int32,
    # token slots (T,) int32
    # outputs: refs[-1] = y_ref (T, sum of out widths): y += delta when accumulate, else the
    # float32 delta itself, written for every token (zeros where there is no adapter)
    accumulate,
    weights,
    widths,
    col_offsets,
    block_starts,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    bn,
    chunk,
    interpret,
):
    g_count = len(weights)
    v_ref, pool_refs, rest = _expand_operands(refs, accumulate, g_count)
    pages_ref, ranks_ref, scales_ref, layer_ref, slot_ref, y_ref = rest
    _, y_cols = y_ref.shape
    t = pl.program_id(1)
    slot = slot_ref[t]

    for g, cb, in_group in _group_of_block(pl.program_id(0), block_starts):
        w = weights[g]
        pool_ref = pool_refs[g]
        width = widths[g]

        # Accumulating, no-adapter tokens and rank-0 weights leave y alone; writing the delta,
        # their loop runs no steps and they store zeros.
        @pl.when(in_group & (slot >= 0) if accumulate else in_group)
        def _group(g=g, cb=cb, w=w, pool_ref=pool_ref, width=width):
            slot_c = jnp.maximum(slot, 0)
            rank = _weight_rank(ranks_ref, slot, slot_c, w, accumulate)

            @pl.when((rank > 0) if accumulate else True)
            def _compute():
                scale = scales_ref[slot_c, w]
                col_ok, cols_i, y_i = _column_block(
                    cb, bn, width, col_offsets[g], y_cols, interpret
                )
                layer = _layer(layer_ref, pool_ref, pages_per_pool[g], rows_per_page)
                y_mask = col_ok if width % bn else None
                if accumulate:
                    # y's tile is loaded before B's rows, so that the two reads overlap.
                    if y_mask is None:
                        yt = y_ref[t, y_i]
                    else:
                        yt = pltriton.load(y_ref.at[t, y_i], mask=y_mask, other=0)

                def body(step, acc):
                    j = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
                    j_ok = j < rank
                    b_row = _pool_rows(
                        pages_ref,
                        slot_c,
                        w,
                        j,
                        layer,
                        pages_per_pool=pages_per_pool[g],
                        rows_per_page=rows_per_page,
                        max_pages=max_pages,
                    )
                    return acc + _rank_chunk_sum(
                        v_ref,
                        pool_ref,
                        t,
                        g,
                        j,
                        j_ok,
                        b_row,
                        cols_i,
                        col_ok if width % bn else None,
                        rank_cols,
                        interpret,
                    )

                acc = jax.lax.fori_loop(
                    0, (rank + chunk - 1) // chunk, body, jnp.zeros((bn,), jnp.float32)
                )
                if not accumulate:
                    out = jnp.where(rank > 0, acc * scale, 0.0)
                else:
                    out = (yt.astype(jnp.float32) + acc * scale).astype(y_ref.dtype)
                pltriton.store(y_ref.at[t, y_i], out, mask=y_mask)


def _per_token_walk_expand_kernel(
    # inputs
    *refs,
    # [y_in (T, sum of out widths), the base output aliased to y_ref: only when accumulate]
    # v (T, G*MP*R) float32 from shrink
    # G B pools, (L*P_g*R, out_g) each
    # pages (S, 7, MP) int32, ranks (S, 7) int32, scales (S, 7) float32, layer (1,) int32,
    # token slots (T,) int32
    # outputs: refs[-1] = y_ref (T, sum of out widths), as in _decode_expand_kernel
    accumulate,
    weights,
    widths,
    col_offsets,
    block_starts,
    rank_cols,
    pages_per_pool,
    rows_per_page,
    max_pages,
    bn,
    chunk,
    tokens,
    interpret,
):
    """_decode_expand_kernel's contract, a program walking ``tokens`` tokens of one column
    block; one rank chunk (``chunk >= rank_cols``) holds every weight's rank rows."""
    g_count = len(weights)
    v_ref, pool_refs, rest = _expand_operands(refs, accumulate, g_count)
    pages_ref, ranks_ref, scales_ref, layer_ref, slot_ref, y_ref = rest
    num_tokens, y_cols = y_ref.shape
    first = pl.program_id(1) * tokens
    j = jnp.arange(chunk, dtype=jnp.int32)

    for g, cb, in_group in _group_of_block(pl.program_id(0), block_starts):
        w = weights[g]
        pool_ref = pool_refs[g]
        width = widths[g]

        @pl.when(in_group)
        def _group(g=g, cb=cb, w=w, pool_ref=pool_ref, width=width):
            col_ok, cols_i, y_i = _column_block(cb, bn, width, col_offsets[g], y_cols, interpret)
            layer = _layer(layer_ref, pool_ref, pages_per_pool[g], rows_per_page)

            def lookup(i):
                """Token first + i's row (clamped), rank (0: nothing to add), scale, B rows."""
                t = jnp.minimum(first + i, num_tokens - 1)
                slot = slot_ref[t]
                slot_c = jnp.maximum(slot, 0)
                rank = jnp.where((first + i < num_tokens) & (slot >= 0), ranks_ref[slot_c, w], 0)
                b_row = _pool_rows(
                    pages_ref,
                    slot_c,
                    w,
                    j,
                    layer,
                    pages_per_pool=pages_per_pool[g],
                    rows_per_page=rows_per_page,
                    max_pages=max_pages,
                )
                return t, rank, scales_ref[slot_c, w], b_row

            def body(i, ahead):
                t, rank, scale, b_row = ahead
                nxt = lookup(jnp.minimum(i + 1, tokens - 1))
                in_range = first + i < num_tokens
                j_ok = j < rank
                store_mask = col_ok & in_range
                if accumulate:
                    store_mask = store_mask & (rank > 0)
                    yt = pltriton.load(y_ref.at[t, y_i], mask=store_mask, other=0)
                acc = _rank_chunk_sum(
                    v_ref, pool_ref, t, g, j, j_ok, b_row, cols_i, col_ok, rank_cols, interpret
                )
                if accumulate:
                    out = (yt.astype(jnp.float32) + acc * scale).astype(y_ref.dtype)
                else:
                    out = jnp.where(rank > 0, acc * scale, 0.0)
                pltriton.store(
                    y_ref.at[t, _idx(y_i, store_mask, y_cols, interpret)], out, mask=store_mask
                )
                return nxt

            jax.lax.fori_loop(0, tokens, body, lookup(0))


def sgmv_expand(
    # inputs
    y: jax.Array | jax.ShapeDtypeStruct,  # (T, sum of out widths), updated (or see below)
    v: jax.Array,  # (T, G, MP*R) float32
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g)
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
    kernel_meta: dict | None = None,
    config: SgmvConfig | None = None,
    per_token: bool = False,
    interpret: bool = False,
) -> jax.Array:  # (T, sum of out widths), y's dtype
    """Pallas Triton expand; same contract as ``sgmv_expand_reference`` (y is updated in place
    when the caller donates it or it is an intermediate inside jit). ``per_token`` as in
    ``sgmv_shrink``: one program per (token, block of y columns) at any T.

    When ``y`` is a ``jax.ShapeDtypeStruct`` (the base output's shape and dtype, no data), it
    returns the float32 delta ``(T, sum of out widths)`` instead, written for every token (zeros
    for NO_ADAPTER tokens and rank-0 weights) without reading a base output; y's dtype still
    picks the dots' operand dtype, as when accumulating. The model uses this form (through
    ``sgmv_delta``): XLA then fuses ``y + delta`` into the ops that consume the base outputs,
    where an in-place update needs the group's outputs concatenated (and any split GEMM's partial
    sums reduced) into one buffer first (docs/BENCHMARKS.md, fifth-session HLO)."""
    config = config or SgmvConfig()
    fn = "sgmv_expand"
    b_pools, widths = _check_b_pools(fn, weights, b_pools)
    g_count = len(weights)
    accumulate = not isinstance(y, jax.ShapeDtypeStruct)
    if len(y.shape) != 2 or y.shape[1] != sum(widths):
        raise ConfigError(
            f"{_WHERE} {fn}: y must be (T, {sum(widths)}) (the group's widths "
            f"{widths} side by side), got shape {y.shape}"
        )
    num_tokens = y.shape[0]
    rank_cols = _check_expand_tables(fn, v, b_pools, b_pages, ranks, scales, token_slot, num_tokens)
    num_slots, _, max_pages = b_pages.shape
    rows_per_page = b_pools[0].shape[2]
    if num_tokens == 0:
        return y if accumulate else jnp.zeros((0, sum(widths)), jnp.float32)
    pool_rows = tuple(p.reshape(-1, p.shape[3]) for p in b_pools)
    layer1 = jnp.asarray(layer, jnp.int32).reshape(1)
    v2 = v.astype(jnp.float32).reshape(num_tokens, g_count * rank_cols)
    col_offsets = tuple(int(o) for o in np.cumsum((0,) + widths[:-1]))
    statics = dict(
        accumulate=accumulate,
        weights=weights,
        widths=widths,
        col_offsets=col_offsets,
        rank_cols=rank_cols,
        pages_per_pool=tuple(int(p.shape[1]) for p in b_pools),
        rows_per_page=rows_per_page,
        max_pages=max_pages,
        interpret=interpret,
    )
    tables = (
        b_pages.astype(jnp.int32),
        ranks.astype(jnp.int32),
        scales.astype(jnp.float32),
        layer1,
    )
    out_shape = jax.ShapeDtypeStruct(y.shape, y.dtype if accumulate else jnp.float32)
    base, aliases, mode = ((y,), {0: 0}, "") if accumulate else ((), {}, "_delta")

    regime = config.regime(num_tokens, per_token=per_token)
    if regime != "prefill":
        if regime == "decode":
            block_n = config.decode_expand_block_n
            warps, stages = config.decode_expand_num_warps, config.decode_expand_num_stages
        else:
            block_n = config.per_token_expand_block_n
            warps, stages = config.per_token_expand_num_warps, config.per_token_expand_num_stages
        bn = min(block_n, _next_pow2(max(widths)))
        chunk = min(config.decode_rank_chunk, _next_pow2(rank_cols))
        block_starts = tuple(int(b) for b in np.cumsum([0] + [_cdiv(w, bn) for w in widths]))
        # Programs walk tokens per token only, where one rank chunk holds the rank rows, and
        # while walking still leaves every SM a program: at T = 64 and out 4,096 (4 column
        # blocks) two tokens a program left 128 programs and took 1.11x-1.16x one token's time
        # (H200, twenty-fifth session's grid against the twenty-third's; in one process, one
        # token 0.83x-0.93x of two on those rows).
        walks = regime == "per_token" and chunk >= rank_cols
        tokens = min(config.per_token_expand_tokens, num_tokens) if walks else 1
        if _cdiv(num_tokens, tokens) * block_starts[-1] < config.target_programs:
            tokens = 1
        geometry = dict(block_starts=block_starts, bn=bn, chunk=chunk, **statics)
        if tokens > 1:
            kernel = functools.partial(_per_token_walk_expand_kernel, tokens=tokens, **geometry)
        else:
            kernel = functools.partial(_decode_expand_kernel, **geometry)
        walk = f"_t{tokens}" if tokens > 1 else ""
        name = f"sgmv_expand{mode}_{regime}_bn{bn}_rc{chunk}{walk}_w{warps}_s{stages}"
        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(block_starts[-1], _cdiv(num_tokens, tokens)),
            input_output_aliases=aliases,
            compiler_params=_compiler_params(warps, stages),
            interpret=interpret,
            name=name,
        )(*base, v2, *pool_rows, *tables, token_slot.astype(jnp.int32))

    meta = _prefill_meta(fn, "expand", kernel_meta, token_slot.astype(jnp.int32), num_slots, config)
    num_tiles = meta[1].shape[0]
    bt = config.expand_block_tokens
    bn = max(16, min(config.expand_block_n, _next_pow2(max(widths))))
    blocks = tuple(_cdiv(w, bn) for w in widths)
    max_steps = _expand_col_steps(config, blocks)
    step_choices = tuple(1 << i for i in range(max_steps.bit_length()))
    # col_programs[i]: cumulative column programs of the group's weights at step_choices[i].
    col_programs = tuple(
        tuple(int(c) for c in np.cumsum([0] + [_cdiv(b, s) for b in blocks])) for s in step_choices
    )
    target = config.expand_waves * config.target_programs
    used = np.arange(1, num_tiles + 1)
    choice = _expand_run_choice(used, col_programs, target, np.where)
    programs = int(np.max(used * np.asarray([cp[-1] for cp in col_programs])[choice]))
    rank_pad = max(16, _next_pow2(rank_cols))
    dtypes = tuple(_compute_dtype(p.dtype, y.dtype) for p in b_pools)
    prefetch_y = config.expand_prefetch_y and accumulate
    name = (
        f"sgmv_expand{mode}_prefill_bt{bt}_bn{bn}_st{max_steps}_w{config.expand_num_warps}"
        f"_s{config.expand_num_stages}{'_py' if prefetch_y else ''}"
    )
    return pl.pallas_call(
        functools.partial(
            _prefill_expand_kernel,
            blocks=blocks,
            step_choices=step_choices,
            col_programs=col_programs,
            target=target,
            bt=bt,
            bn=bn,
            rank_pad=rank_pad,
            dtypes=dtypes,
            prefetch_y=prefetch_y,
            **statics,
        ),
        out_shape=out_shape,
        grid=(programs,),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(config.expand_num_warps, config.expand_num_stages),
        interpret=interpret,
        name=name,
    )(*base, v2, *pool_rows, *tables, *meta)


# ------------------------------------------------------------------------------------------------
# shrink + expand of one module group (the model's entry point)
# ------------------------------------------------------------------------------------------------


def sgmv_apply_reference(
    # inputs
    x: jax.Array,  # (T, in)
    y: jax.Array,  # (T, sum of out widths), updated
    a_pool: jax.Array,  # (L, P, R, in)
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g)
    a_pages: jax.Array,  # (S, 7, MP) int32
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
) -> jax.Array:  # (T, sum of out widths), y's dtype
    v = sgmv_shrink_reference(x, a_pool, a_pages, ranks, token_slot, layer, weights=weights)
    return sgmv_expand_reference(
        y, v, b_pools, b_pages, ranks, scales, token_slot, layer, weights=weights
    )


def sgmv_apply(
    # inputs
    x: jax.Array,  # (T, in)
    y: jax.Array | jax.ShapeDtypeStruct,  # (T, sum of out widths), updated
    a_pool: jax.Array,  # (L, P, R, in)
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g)
    a_pages: jax.Array,  # (S, 7, MP) int32
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
    kernel_meta: dict | None = None,
    config: SgmvConfig | None = None,
    per_token: bool = False,
    interpret: bool = False,
) -> jax.Array:  # (T, sum of out widths), y's dtype
    """y += each token's LoRA delta for a module group (``sgmv_apply_reference``): ``sgmv_shrink``
    then ``sgmv_expand``, two launches. Given a ``jax.ShapeDtypeStruct`` for y, it returns the
    float32 delta instead (``sgmv_expand``'s delta form; ``sgmv_delta``). ``per_token``: both
    kernels per token at any T (``choose_per_token``).

    (A single-launch variant, each program recomputing its token's v for its block of y columns,
    was measured slower at every decode size: docs/BENCHMARKS.md, "Fifth session".)
    """
    v = sgmv_shrink(
        x,
        a_pool,
        a_pages,
        ranks,
        token_slot,
        layer,
        weights=weights,
        kernel_meta=kernel_meta,
        config=config,
        per_token=per_token,
        interpret=interpret,
    )
    return sgmv_expand(
        y,
        v,
        b_pools,
        b_pages,
        ranks,
        scales,
        token_slot,
        layer,
        weights=weights,
        kernel_meta=kernel_meta,
        config=config,
        per_token=per_token,
        interpret=interpret,
    )


def sgmv_delta_reference(
    # inputs
    x: jax.Array,  # (T, in)
    a_pool: jax.Array,  # (L, P, R, in)
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g)
    a_pages: jax.Array,  # (S, 7, MP) int32
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
) -> jax.Array:  # (T, sum of out widths) float32, zero for NO_ADAPTER tokens
    zeros = jnp.zeros((x.shape[0], sum(p.shape[3] for p in b_pools)), jnp.float32)
    return sgmv_apply_reference(
        x, zeros, a_pool, b_pools, a_pages, b_pages, ranks, scales, token_slot, layer,
        weights=weights,
    )  # fmt: skip


def sgmv_delta(
    # inputs
    x: jax.Array,  # (T, in)
    a_pool: jax.Array,  # (L, P, R, in)
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g)
    a_pages: jax.Array,  # (S, 7, MP) int32
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
    out_dtype=None,
    kernel_meta: dict | None = None,
    config: SgmvConfig | None = None,
    per_token: bool = False,
    interpret: bool = False,
) -> jax.Array:  # (T, sum of out widths) float32
    """Each token's LoRA delta for a module group (``sgmv_delta_reference``): ``sgmv_shrink`` then
    ``sgmv_expand`` in its delta form, two launches. ``out_dtype`` is the dtype of the base output
    the delta will be added to (x's by default); it picks the expand's dot operand dtype.

    The model adds the delta to each base output itself, so that XLA fuses the adds into their
    consumers (RoPE, the KV-cache write, the residual add, SwiGLU)."""
    width = sum(int(p.shape[3]) for p in b_pools)
    base = jax.ShapeDtypeStruct((x.shape[0], width), out_dtype or x.dtype)
    return sgmv_apply(
        x, base, a_pool, b_pools, a_pages, b_pages, ranks, scales, token_slot, layer,
        weights=weights, kernel_meta=kernel_meta, config=config, per_token=per_token,
        interpret=interpret,
    )  # fmt: skip


__all__ = [
    "SgmvConfig",
    "build_sgmv_metadata",
    "build_sgmv_metadata_jnp",
    "choose_per_token",
    "choose_tiles",
    "num_tiles_bound",
    "sgmv_apply",
    "sgmv_apply_reference",
    "sgmv_delta",
    "sgmv_delta_reference",
    "sgmv_expand",
    "sgmv_expand_reference",
    "sgmv_shrink",
    "sgmv_shrink_reference",
]

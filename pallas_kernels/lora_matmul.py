"""A decode-step projection with the LoRA expand in its epilogue: one launch for ``x @ W`` and
every token's ``scale * v @ B``.

    y[t, :] = x[t] @ W[layer] + sum_g scale[slot_t, w_g] * v[t, g, :r] @ B_{w_g}[slot_t]

``W`` is a layer-stacked base kernel ``(L, K, N)`` read in place at a traced ``layer`` (the
kernel computes the layer's offset, so neither ``lax.scan`` nor the unrolled loop has to slice,
and XLA cannot materialize a per-layer copy before the call). ``N`` is the fused group's
output: for q|k|v it is the q, k and v columns side by side (``jaxlora.model.FUSED_PROJECTIONS``,
one group), for o and down the single weight's. ``v`` is the shrink output
(``pallas_kernels.sgmv.sgmv_shrink``) and the B pools, pages, ranks, scales and token slots are
those of the paged adapter pool (``pallas_kernels/layout.py``); rows beyond a weight's rank are
never loaded, tokens whose slot is NO_ADAPTER get the base output alone.

Why: in a decode step XLA runs each projection as a Triton GEMM split along K, whose float32
partials a later fusion sums (docs/BENCHMARKS.md, fifth-session HLO), and with LoRA the expand is
a second launch per group. Here each program owns a block of output columns for a block of
tokens, walks the whole K (no partials) on the tensor cores, then adds the LoRA delta of each of
its tokens before the single rounding to the output dtype. One launch per (layer, group) for
base + expand; the shrink stays its own launch.

The epilogue (``MatmulConfig.epilogue``). Up to 32 tokens per program ("dot"): static steps,
each a tensor-core dot of a block-diagonal tile of some tokens' scaled v, ``(bm, K)``, with
those tokens' B rank rows stacked, ``(K, bn)``; the page-table gathers that locate the B rows go
out before the K loop, so after it only the B and v loads remain. Above ("rows"): a loop over
rank rows, each step gathering one B row of every token and adding it on the CUDA cores.
``MatmulConfig.dot_block_m`` (off by default) splits a program's tokens into sub-blocks, one
dot each per K step on the same weight tile, each with its own epilogue: the dot epilogue for
128 tokens without a (128, K) v tile; it lost at T = 128 (1.4-1.5x the rows epilogue's time,
eleventh session). ``epilogue="rows_prefetch"`` is the rows loop software-pipelined by hand:
each step's B rows and v are loaded one step ahead, their page-table entries two. It measured
2% faster than "rows" on q|k|v at T = 128 alone, within the noise; in the 32-layer engine it
took batch 64's step (blocks of 64 tokens) 4% under "rows" but batch 128's 20% over (H200,
nineteenth session), so it runs above 32 and up to ``prefetch_epilogue_max_tokens`` = 64 tokens
a block.

Where the terms join (``MatmulConfig.lora_first``): with the dot epilogue they start the
accumulator, before the K loop, and the K loop adds the base product to them; the rows
epilogues add theirs after it. Before, the B and v loads of a program's epilogue go out while
the other programs of its SM stream their weight tiles; after, every program waits for them at
the end of its loop. On the H100 (forty-eighth session) that took batch 32's decode iteration
1-2% lower with several adapters; batch 64 (the rows epilogues) rose 0.7% with it.

The few-adapters epilogue (``MatmulConfig.epilogue_adapters``, on by default). Before its K
loop a program lists the distinct adapter slots of its tokens, up to ``epilogue_adapters`` of
them; if that is all, its epilogue adds each adapter's delta as tensor-core dots of that
adapter's tokens' scaled v (every other token's row zero) by its B rows, ``adapter_rank_rows``
at a time, read once, instead of the dot or rows epilogue's per-token B rows (which read one
adapter's rows 32 or 128 times). In the 32-layer scan engine (H200, fifteenth session) one
adapter's decode step fell 4.8% at batch 32 and 10.6% at batch 128; blocks with more adapters
pay 0.4-0.9% for the listing. Blocks of at least ``wide_epilogue_min_tokens`` = 64 tokens list
up to ``wide_epilogue_adapters`` = 8: batch 64 with 8 adapters fell 5.9%, while blocks of 16
tokens with 8 adapters (batch 8, distinct) rose 6% (nineteenth session).

The shrink in the K loop (``LoraExpand.shrink`` / ``MatmulConfig.shrink_rows``, on by
default for steps of at most ``shrink_max_tokens`` = 64 tokens). A step whose adapters need few
rank rows in all lists them (``build_shrink_rows``: slot and rank row each); every program then
runs one more dot a K step, its tokens' x tile by those A rows, ``(bm, J)`` float32 at the end
of its K steps (a K part's share), and its epilogue one dot of that v, each token's row kept in
its own slot's columns and scaled, by the rows' B rows: one launch per group instead of the
SGMV shrink and this kernel. Every column block redoes the shrink (A from L2). The shrink dot
comes first in the K loop: second, Triton split the warps along M and ran 96 warp MMAs a K step
at T = 32 (the base kernel 32), and the step took 20% longer (sixteenth session); first, the
split stays along N (48 MMAs) and in the 32-layer engine (H200, one adapter, J = 32) the step
fell 8% at batch 8, 7% at batch 32 and 7% at batch 64, but rose 5% at batch 128 (seventeenth
and eighteenth sessions), hence the token limit.

The K split (``MatmulConfig.split_k`` / ``min_programs``, on by default for few column
blocks): o and down (N = 4096) run 64 columns per program and 4 programs along K, each writing
a float32 partial that the wrapper sums (XLA fuses the sum into the residual add); the LoRA
epilogue's rank rows (or dot steps) are shared out among the parts. In the 32-layer scan
engine (H200, eleventh session) this took the decode step from 1.42x to 1.37x its roofline at
batch 32 without LoRA and from 1.62x to 1.46x at batch 128 with 128 distinct adapters.

Measured on the H200 (docs/BENCHMARKS.md, "Decode projections in our own kernel"). Per
projection, unrolled: 0.85-1.05x XLA's GEMMs without LoRA; with LoRA the dot epilogue beats XLA's
GEMM + SGMV expand on 8 of 16 rows at T = 8 and 32 (up to 1.27x), the rows epilogue lost 21 of
24. Inside a loop over layers it keeps its speed where XLA's GEMMs take 2.1-2.8x longer (they
copy the layer's slice first): in the engine's scan loop (32-layer 7B) it gave 1.18-2.19x XLA's
tokens/s, hence ``RunnerConfig.projection_kernel="auto"`` uses it there. At T = 128 with
LoRA (tenth session) the rows epilogue is the fastest of those timed: XLA + SGMV took 1.07x /
0.99x its time (q|k|v / o, distinct adapters); the dot epilogue over the whole block 1.8-2.4x,
row blocks of 32 with the dot epilogue 1.3-1.5x.

Grid: (ceil(T / block_m), N / block_n[, split]). Every width of the group must be a multiple
of block_n so that a column block belongs to one weight (``lora_matmul`` checks,
``MatmulConfig.block_n_for`` picks one). The kernel is meant for decode-sized T
(``MatmulConfig.max_tokens``; above ``plain_max_tokens`` only steps whose shrink runs in its K
loop); prefill keeps XLA's GEMM and the SGMV kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.errors import ConfigError
from pallas_kernels.paged_attention import _layer_scalar
from pallas_kernels.sgmv import (
    KernelConfig,
    SgmvConfig,
    _check_b_pools,
    _check_expand_tables,
    _check_pool,
    _dot_precision,
    _group_of_block,
    _idx,
    _layer,
    _next_pow2,
    _pool_rows,
    sgmv_expand_reference,
    sgmv_shrink,
    sgmv_shrink_reference,
)

_WHERE = "pallas_kernels/lora_matmul.py"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulConfig(KernelConfig):
    """Tuning knobs of ``lora_matmul`` (powers of two; blocks shrink to tiny test shapes).

    ``None`` block sizes follow the H200 sweeps (docs/BENCHMARKS.md, eighth and eleventh
    sessions). Columns per program: the widest block up to ``max_block_n`` that still gives at
    least ``column_programs`` column blocks (q|k|v: 64, gate|up: 128 at llama-2-7b widths), else
    ``narrow_block_n`` (o, down), whose few programs the K split then multiplies up to
    ``min_programs``. The K step keeps a program's weight tile at 8192 elements up to
    ``small_tokens`` tokens and 4096 above (the x tile grows with T)."""

    block_m: int = 128  # most tokens per program (the M of its dots; at least 16)
    # Fewest tokens per program, however few the step has (rows past T are masked, never
    # loaded). Below 64 rows a block Triton runs the dots as warp MMAs (mma.sync, HMMA: 32 a
    # K step and warp at T = 32); from 64 as Hopper's asynchronous warpgroup MMAs (HGMMA),
    # sixteenth-session compiler report. 64 gives small decode steps the warpgroup MMAs for
    # twice the (masked) rows: off (16), as the 32-layer engine's batch-32 steps took 3.6-7.8%
    # longer with it (H200, eighteenth session; with num_stages 3, thirty-sixth session:
    # -1.3% without LoRA, within the noise, +6.6% with 32 distinct adapters).
    min_block_m: int = 16
    block_n: int | None = None  # output columns per program
    block_k: int | None = None  # input-width step
    num_warps: int = 4
    num_stages: int = 4
    # Warps of programs whose output tile (block_m x block_n) has at least large_block_elements
    # elements (None: num_warps). With 4 warps, gate|up's (128, 128) float32 accumulator at
    # T = 128 is 128 registers a thread, and Triton spills: 39 local loads / 41 stores without
    # LoRA, 1,150 / 1,150 with the expand epilogue listing 8 adapters (694 / 676 with 4), and
    # its K loop runs 248 instructions; with 8 warps none, and 129 (compiler report,
    # nineteenth session: ``kernel_report.py --tokens=128 --groups=gate_up``). Off: in the
    # 32-layer engine at batch 128 (H200, twentieth session) 8 warps made the step slower,
    # +1.3% without LoRA and +9.9% to +19.2% with it; from 64 x 128 tiles also at batch 64.
    large_block_num_warps: int | None = None
    large_block_elements: int = 128 * 128
    max_block_n: int = 128
    column_programs: int = 160
    narrow_block_n: int = 64
    small_tokens: int = 32
    # Split along K: each of ``split`` programs per output block walks 1/split of K and writes
    # float32 partials (split, T, N), which the wrapper sums (XLA fuses the sum into the
    # consumer: the residual add, RoPE). The LoRA epilogue's work is shared out too: rank rows
    # (rows epilogue) or steps (dot epilogue) i go to the program i % split. Why: o and down
    # (N = 4096) have few column blocks, and narrow blocks re-read x once per block; the rows
    # epilogue is a chain of dependent gathers that a split shortens. None: the smallest power
    # of two that gives at least ``min_programs`` programs (``rows_epilogue_min_programs`` when
    # the rows epilogue runs; 0: no split), at most ``max_split_k`` and at most the K steps.
    split_k: int | None = None
    min_programs: int = 160
    rows_epilogue_min_programs: int | None = None
    max_split_k: int = 8
    # At most this share of the weights' bytes in partials' traffic (float32, written and read)
    # when the split is chosen by min_programs (None: no cap). The partials grow with T: at
    # T = 128, o's 4 parts move 16.8 MB beside its 33.5 MB of weights, and the per-projection
    # sweep (eleventh session) had o fastest with 2 parts there and down with 4; a share of 0.3
    # picks exactly that. In the engine (twelfth session) 0.3 was within the noise (-0.8% to
    # +0.9% step time), so it stays off.
    max_partial_share: float | None = None
    # How the epilogue adds the LoRA delta. "dot": static steps, each gathering the B rows of
    # some tokens' rank chunk, ``(epilogue_block_k, block_n)``, and multiplying them on the
    # tensor cores by a block-diagonal tile of those tokens' scaled v; the page-table gathers go
    # out before the K loop. Its steps grow with block_m times the pool's rank capacity. "rows"
    # (the eighth session's): a loop over rank rows, each step gathering one row of every
    # token's B and adding it on the CUDA cores. "rows_prefetch": the same steps software-
    # pipelined by hand: step i adds the B rows and v loaded during step i - 1, issues the loads
    # of step i + 1 and the page-table loads of step i + 2, so a step waits for about one load
    # instead of a chain of two (2% faster on q|k|v at T = 128, within the noise). None: "dot"
    # up to ``dot_epilogue_max_tokens`` tokens per program, "rows_prefetch" up to
    # ``prefetch_epilogue_max_tokens``, "rows" above. In the 32-layer engine (H200, nineteenth
    # session) "rows_prefetch" took batch 64's step from 10.26 to 9.83 ms (skewed) and from 10.43
    # to 9.98 ms (distinct), but batch 128's from 14.35 to 17.35 ms and from 15.17 to 18.00 ms.
    epilogue: str | None = None
    dot_epilogue_max_tokens: int = 32
    prefetch_epilogue_max_tokens: int = 64
    epilogue_rank_rows: int = 16  # rank rows of a token per dot step (power of two)
    epilogue_block_k: int = 256  # K of each epilogue dot (tokens x rank rows)
    # Rank rows per token whose B-row indices the dot epilogue computes before the K loop (None:
    # all of the pool's). Rank chunks beyond compute theirs inside their own step, which runs
    # only when a token of the block has that many rows. 16 (rank-16 adapters in a pool of rank
    # 64) measured no faster on the H200 (docs/BENCHMARKS.md, tenth session), so all by default.
    epilogue_prepared_rank_rows: int | None = None
    # Most tokens per program when the epilogue runs (None: block_m); the dot epilogue's steps
    # grow with the tokens of a program.
    expand_block_m: int | None = None
    # A block whose tokens use at most this many distinct adapters (decided at run time from
    # its token slots) adds their deltas by adapter instead: per adapter and rank chunk of
    # ``adapter_rank_rows``, one tensor-core dot of its tokens' scaled v (the other tokens'
    # rows zero) by its B rows, read once. The dot and rows epilogues read one B row block per
    # token, which with one adapter re-reads the same rows 32 or 128 times (+26 us a gate|up
    # launch at T = 128, fifteenth-session profile). 0: off.
    epilogue_adapters: int = 4
    # Blocks of at least wide_epilogue_min_tokens tokens take it with up to this many adapters
    # (at least epilogue_adapters): the more tokens a block has, the more times the per-token
    # epilogues re-read an adapter's rows. In the 32-layer engine (H200, nineteenth session) 8
    # took batch 64's step with 8 adapters from 9.37 to 8.82 ms; at batch 8 (blocks of 16) it
    # took 8 distinct adapters' step from 5.14 to 5.45 ms (one token each: nothing to share).
    wide_epilogue_adapters: int = 8
    wide_epilogue_min_tokens: int = 64
    # Rank rows of each of those dots (a power of two >= 16; at most the pool's rank rounded
    # up): rows beyond an adapter's rank are masked, never loaded, so wide chunks cost little,
    # and each chunk is a branch of its own in the kernel's code.
    adapter_rank_rows: int = 64
    # A step of at most shrink_max_tokens tokens whose adapters' rank rows (each adapter's
    # largest rank) add up to at most this runs its shrink inside lora_matmul's K loop
    # (``LoraShrink``; the engine lists the rows per step, ``build_shrink_rows``): one more dot
    # a K step by those A rows, redundant in each column block but read from L2, and one
    # epilogue dot by their B rows, instead of a shrink launch per group, which with one
    # adapter costs ~4 us a launch for ~0.1 us of bytes (fifteenth-session profile). A power of
    # two >= 16 (the dots' N and K); 0: off, every step runs the SGMV shrink. In the 32-layer
    # engine (H200, one adapter, eighteenth session) it took the step from 4.94 to 4.53 ms at
    # batch 8 and from 6.32 to 5.86 ms at batch 32. 64 rows cost more than they save at batch
    # 32 (6.88 ms with one adapter) and won less at batch 8 (4.71 ms; 3 adapters, 48 rows:
    # 4.78 against 5.06 ms).
    shrink_rows: int = 32
    # Steps of more tokens keep the SGMV shrink even when their rows fit in shrink_rows: at
    # batch 128 (seventeenth session, one adapter) the shrink in the K loop took the step from
    # 11.37 to 11.95 ms; at batch 64 (eighteenth) from 8.22 to 7.67 ms.
    shrink_max_tokens: int = 64
    # Tokens of each tensor-core dot when the LoRA epilogue runs (None: the program's row
    # block; the base-only kernel keeps whole-block dots). A program of bm tokens then runs
    # bm / dot_block_m dots per K step on one weight tile, and its epilogue per such
    # sub-block: the dot epilogue's v tile is (dot_block_m, epilogue_block_k), not (bm, ...),
    # and the dot / rows choice follows dot_block_m. At T = 128 (tenth session, H200) the dot
    # epilogue over whole blocks of 128 took 1.8-2.4x the rows epilogue's time (its (128, 256)
    # v tile is 8x the useful work and likely spills), row blocks of 32 1.3-1.5x (the weights
    # read 4 times); sub-blocks keep one weight read and small v tiles, but took 1.4x (16) and
    # 1.5x (32) the rows epilogue's time on q|k|v at T = 128 (eleventh session).
    dot_block_m: int | None = None
    # Whether the expand epilogue's LoRA terms (dot, rows or few-adapters; not the in-loop
    # shrink's, whose v the K loop computes) start the accumulator before the K loop instead
    # of joining it after. None: first where the dot epilogue runs. On the H100 (forty-eighth
    # session, 32-layer engine) first took batch 32's async iteration from 8.49-8.51 to 8.35 ms
    # (uniform), 8.75 to 8.65 (skewed), 8.89 to 8.83 (distinct; four interleaved processes),
    # and batch 8's distinct from 6.49 to 6.39; batch 64 (the pipelined rows epilogue) rose
    # 0.7% (skewed, distinct), hence only with the dot epilogue. Per projection at T = 32:
    # uniform -1.3% (q|k|v) to -6% (o), distinct -1.8% (down) to +0.8% (gate|up). Added
    # inside the K loop instead, at one step under a branch, so that the B loads overlap the
    # weight tiles already in flight, the terms cost more: Triton gave the kernel 120 KiB of
    # shared memory instead of 72 (fewer programs an SM) and spilled, and every projection
    # took 6-20% longer (c26d933).
    lora_first: bool | None = None
    # T <= this: the model runs its decode projections through lora_matmul; larger T keeps
    # XLA's GEMM and the SGMV delta. In the 32-layer 7B engine (H200, scan loop, thirtieth
    # session) XLA's cuBLAS GEMMs (RunnerConfig.xla_gemms), reading each layer's slice in
    # place, made batch 128's async iteration 9.87 ms without LoRA and 13.94 ms with 128
    # distinct adapters, against lora_matmul's 10.26 / 14.57 ms (one layer a scan iteration
    # both); at batch 32 lora_matmul was ahead (5.58 / 7.04 ms with two layers an iteration
    # against 5.64 / 7.27 ms).
    max_tokens: int = 64
    # T above this (up to max_tokens): lora_matmul runs the step only where its K loop runs the
    # shrink (a step whose adapters fit in shrink_rows: one launch a group); other steps (no
    # LoRA, many adapters) take XLA's cuBLAS GEMMs and the SGMV delta. Batch 64 in the 7B
    # engine (H200, thirty-first session, one process): cuBLAS 6.95 / 9.33 ms without LoRA /
    # with 64 distinct adapters against lora_matmul's 7.07 / 9.80 ms, but 8.32 against 7.52 ms
    # with one adapter (the in-loop shrink).
    plain_max_tokens: int = 32

    def __post_init__(self):
        self._check_partial_share()
        for name in (
            "block_m",
            "min_block_m",
            "expand_block_m",
            "dot_block_m",
            "block_n",
            "block_k",
            "max_block_n",
            "narrow_block_n",
        ):
            value = getattr(self, name)
            optional = name not in ("block_m", "min_block_m", "max_block_n", "narrow_block_n")
            if optional and value is None:
                continue
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConfigError(
                    f"MatmulConfig field {name!r}: expected a power of two >= 16 (a "
                    f"tensor-core dot dimension)"
                    f"{' or None' if optional else ''}, "
                    f"got {value!r}"
                )
        shrink_rows = self.shrink_rows
        if shrink_rows != 0 and (
            not isinstance(shrink_rows, int) or shrink_rows < 16 or shrink_rows & (shrink_rows - 1)
        ):
            raise ConfigError(
                f"MatmulConfig field 'shrink_rows': expected 0 (off) or a power of two >= 16 (a "
                f"tensor-core dot dimension), got {shrink_rows!r}"
            )
        if self.lora_first not in (None, True, False):
            raise ConfigError(
                f"MatmulConfig field 'lora_first': expected true, false or None, "
                f"got {self.lora_first!r}"
            )
        if self.epilogue not in (None, "dot", "rows", "rows_prefetch"):
            raise ConfigError(
                f"MatmulConfig field 'epilogue': expected 'dot', 'rows', 'rows_prefetch' or None, "
                f"got {self.epilogue!r}"
            )
        rank_rows = self.epilogue_rank_rows
        if not isinstance(rank_rows, int) or rank_rows < 1 or rank_rows & (rank_rows - 1):
            raise ConfigError(
                f"MatmulConfig field 'epilogue_rank_rows': expected a power of two >= 1, "
                f"got {rank_rows!r}"
            )
        for name in ("epilogue_block_k", "adapter_rank_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConfigError(
                    f"MatmulConfig field {name!r}: expected a power of two >= 16 (a "
                    f"tensor-core dot dimension), got {value!r}"
                )
        # (field, least value, None allowed)
        for name, at_least, optional in (
            ("num_warps", 1, False),
            ("large_block_num_warps", 1, True),
            ("large_block_elements", 1, False),
            ("num_stages", 1, False),
            ("max_tokens", 1, False),
            ("plain_max_tokens", 1, False),
            ("shrink_max_tokens", 1, False),
            ("column_programs", 0, False),
            ("small_tokens", 1, False),
            ("dot_epilogue_max_tokens", 1, False),
            ("prefetch_epilogue_max_tokens", 1, False),
            ("wide_epilogue_adapters", 0, False),
            ("wide_epilogue_min_tokens", 1, False),
            ("epilogue_prepared_rank_rows", 0, True),
            ("epilogue_adapters", 0, False),
            ("split_k", 1, True),
            ("min_programs", 0, False),
            ("rows_epilogue_min_programs", 0, True),
            ("max_split_k", 1, False),
        ):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or value < at_least:
                raise ConfigError(
                    f"MatmulConfig field {name!r}: expected an int >= {at_least}, got {value!r}"
                )

    def _check_partial_share(self):
        share = self.max_partial_share
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0
        ):
            raise ConfigError(
                f"MatmulConfig field 'max_partial_share': expected a number > 0 or None, "
                f"got {share!r}"
            )

    def num_warps_for(self, bm: int, bn: int) -> int:
        """Warps of a program with a (bm, bn) output tile."""
        if self.large_block_num_warps is not None and bm * bn >= self.large_block_elements:
            return self.large_block_num_warps
        return self.num_warps

    def block_n_for(self, widths) -> int:
        """The largest block of output columns up to the preferred one (>= 16) dividing every
        width, or 0 when there is none."""
        bn = self.block_n
        if bn is None:
            bn = self.max_block_n
            while bn > self.narrow_block_n and sum(widths) // bn < self.column_programs:
                bn //= 2
            if sum(widths) // bn < self.column_programs:
                bn = self.narrow_block_n
        while bn >= 16:
            if all(w % bn == 0 for w in widths):
                return bn
            bn //= 2
        return 0

    def block_k_for(self, num_tokens: int, bn: int) -> int:
        if self.block_k is not None:
            return self.block_k
        return max(16, (8192 if num_tokens <= self.small_tokens else 4096) // bn)

    def split_k_for(
        self,
        programs: int,
        k_blocks: int,
        *,
        rows_epilogue: bool = False,
        partial_bytes: int = 0,
        weight_bytes: int = 0,
    ) -> int:
        """Programs per output block along K, for ``programs`` output blocks and ``k_blocks``
        K steps in all (every split gets at least one step); ``partial_bytes``: one part's
        partials written and read, against ``weight_bytes`` for ``max_partial_share``."""
        if self.split_k is not None:
            return max(1, min(self.split_k, k_blocks))
        target = self.min_programs
        if rows_epilogue and self.rows_epilogue_min_programs is not None:
            target = self.rows_epilogue_min_programs
        share = self.max_partial_share
        split = 1
        while programs * split < target and 2 * split <= min(self.max_split_k, k_blocks):
            if share is not None and 2 * split * partial_bytes > share * weight_bytes:
                break
            split *= 2
        return split

    def block_m_for(self, num_tokens: int, *, expand: bool = False) -> int:
        bm = self.expand_block_m if expand and self.expand_block_m else self.block_m
        return max(self.min_block_m, min(bm, _next_pow2(num_tokens)))

    def dot_block_m_for(self, bm: int, *, expand: bool = True) -> int:
        """Tokens of each dot (a sub-block) in a program of ``bm`` tokens."""
        return min(self.dot_block_m or bm, bm) if expand else bm

    def epilogue_for(self, bm: int) -> str:
        if self.epilogue:
            return self.epilogue
        if bm <= self.dot_epilogue_max_tokens:
            return "dot"
        return "rows_prefetch" if bm <= self.prefetch_epilogue_max_tokens else "rows"

    def lora_first_for(self, bm: int) -> bool:
        """Whether blocks of ``bm`` tokens add their LoRA terms before the K loop."""
        if self.lora_first is not None:
            return self.lora_first
        return self.epilogue_for(bm) == "dot"

    def epilogue_adapters_for(self, bm: int) -> int:
        """Most adapters a block of ``bm`` tokens may have to take the few-adapters epilogue
        (0: off)."""
        if not self.epilogue_adapters or bm < self.wide_epilogue_min_tokens:
            return self.epilogue_adapters
        return max(self.epilogue_adapters, self.wide_epilogue_adapters)

    def epilogue_blocks(self, bm: int, rank_cols: int) -> tuple[int, int, int]:
        """(rank rows per token, K, prepared rank rows) of the epilogue's dot steps; K is at most
        the block's tokens times its rank rows; the prepared rows are whole rank chunks, at most
        the pool's."""
        rank_rows = min(self.epilogue_rank_rows, _next_pow2(rank_cols))
        ek = min(self.epilogue_block_k, _next_pow2(bm) * rank_rows)
        chunks = -(-rank_cols // rank_rows)
        if self.epilogue_prepared_rank_rows is not None:
            chunks = min(chunks, -(-self.epilogue_prepared_rank_rows // rank_rows))
        prepared = chunks * rank_rows
        return rank_rows, max(16, ek), prepared


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["a_pool", "a_pages", "rows"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class LoraShrink:
    """The shrink's operands when ``lora_matmul`` runs it in its own K loop (``LoraExpand.shrink``,
    for a step with few adapters): ``rows`` lists the rank rows to compute, each a slot and a rank
    row of it (``build_shrink_rows``); a token gets the delta of its slot's listed rows only."""

    a_pool: jax.Array  # (L, P, R, K) A rank-rows
    a_pages: jax.Array  # (S, 7, MP) int32
    rows: jax.Array  # (2, J) int32: slot (-1: unused row) and rank row of each shrink row


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["v", "b_pools", "b_pages", "ranks", "scales", "token_slot", "shrink"],
    meta_fields=["weights"],
)
@dataclasses.dataclass(frozen=True)
class LoraExpand:
    """The LoRA operands of ``lora_matmul`` (one module group); a pytree, weights static.
    ``v`` is the shrink's output, or None with ``shrink``: then the kernel computes v itself."""

    v: jax.Array | None  # (T, G, MP*R) float32, the shrink output
    b_pools: tuple[jax.Array, ...]  # G pools (L, P, R, out_g)
    b_pages: jax.Array  # (S, 7, MP) int32
    ranks: jax.Array  # (S, 7) int32
    scales: jax.Array  # (S, 7) float32
    token_slot: jax.Array  # (T,) int32, NO_ADAPTER = -1
    weights: tuple[int, ...]  # weight indices of the group, e.g. (0, 1, 2) for q|k|v
    shrink: LoraShrink | None = None


@dataclasses.dataclass(frozen=True)
class _Epilogue:
    """The expand epilogue's static layout (hashable: the kernel closes over it)."""

    weights: tuple[int, ...]  # weight indices of the group
    block_starts: tuple[int, ...]  # first column block of each weight, then the block count
    rank_cols: int  # MP * R: v's columns per weight
    pages_per_pool: tuple[int, ...]  # P of each weight's B pool
    rows_per_page: int
    max_pages: int
    # The rows epilogue: whether its steps are software-pipelined ("rows_prefetch").
    prefetch_rows: bool = False
    # The dot epilogue (0: the rows epilogue): rank rows per token and K of each dot step, and
    # the rank rows whose indices are computed before the K loop.
    rank_rows: int = 0
    epilogue_k: int = 0
    prepared_rank_rows: int = 0
    # The few-adapters epilogue (0: off): most adapters a block may have to take it, and the
    # rank rows of each of its dots.
    adapters: int = 0
    adapter_rank_rows: int = 0
    # The shrink in the K loop (0: v is an input): its rank rows J and the A pool's pages.
    shrink_rows: int = 0
    a_pages_per_pool: int = 0
    # The LoRA terms start the accumulator, before the K loop (MatmulConfig.lora_first).
    first: bool = False


# Past a block's last adapter slot in ``_block_adapters`` (above any slot index).
_NO_MORE = 2**30


class _BlockAdapters(NamedTuple):
    """A (sub-)block's tokens by adapter, from ``_block_adapters`` (traced values)."""

    slot: jax.Array  # (bm,) int32 each token's slot, -1 without an adapter
    has_adapter: jax.Array  # (bm,) bool
    adapters: tuple  # its first distinct slots, ascending, _NO_MORE past the last (scalars)
    every: jax.Array  # () bool: those are all of its adapters


def lora_matmul_reference(
    # inputs
    x: jax.Array,  # (T, K) activations
    w: jax.Array,  # (L, K, N) layer-stacked base kernels
    layer: jax.Array | int,  # () int32
    *,
    lora: LoraExpand | None = None,
    bias: jax.Array | None = None,  # (L, N) layer-stacked
    out_dtype=None,
) -> jax.Array:  # (T, N) out_dtype (x's by default)
    out_dtype = out_dtype or x.dtype
    layer = _layer_scalar(layer, w.shape[0])
    y = jnp.dot(
        x.astype(jnp.float32),
        w[layer].astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    if bias is not None:
        y = y + bias[layer].astype(jnp.float32)
    if lora is not None:
        v = lora.v if lora.shrink is None else _listed_shrink_reference(x, lora, layer)
        y = sgmv_expand_reference(
            y,
            v,
            lora.b_pools,
            lora.b_pages,
            lora.ranks,
            lora.scales,
            lora.token_slot,
            layer,
            weights=lora.weights,
        )
    return y.astype(out_dtype)


def _listed_shrink_reference(x, lora: LoraExpand, layer):
    """v of ``lora.shrink``'s listed rank rows: each token's shrink output with the columns of
    rows not listed for its slot zeroed."""
    shrink = lora.shrink
    v = sgmv_shrink_reference(
        x, shrink.a_pool, shrink.a_pages, lora.ranks, lora.token_slot, layer, weights=lora.weights
    )
    num_slots, rank_cols = lora.ranks.shape[0], v.shape[2]
    slot, row = shrink.rows[0], shrink.rows[1]
    ok = (slot >= 0) & (slot < num_slots) & (row >= 0) & (row < rank_cols)
    listed = (
        jnp.zeros((num_slots, rank_cols), bool)
        .at[jnp.where(ok, slot, num_slots), jnp.where(ok, row, 0)]
        .set(True, mode="drop")
    )
    token_slot = lora.token_slot
    keep = (token_slot >= 0)[:, None] & listed[jnp.clip(token_slot, 0, num_slots - 1)]
    return jnp.where(keep[:, None, :], v, 0.0)


def build_shrink_rows(ranks, slots, num_rows: int) -> np.ndarray | None:
    """``LoraShrink.rows`` (2, num_rows) int32 on the host: every rank row of each slot in
    ``slots`` (as many as its largest rank over the 7 weights), in order, then unused rows (slot
    -1); None when they need more than ``num_rows`` rows."""
    ranks = np.asarray(ranks)
    rows = np.zeros((2, num_rows), np.int32)
    rows[0] = -1
    used = 0
    for slot in slots:
        rank = int(ranks[slot].max(initial=0))
        if used + rank > num_rows:
            return None
        rows[0, used : used + rank] = slot
        rows[1, used : used + rank] = np.arange(rank)
        used += rank
    return rows


class _ShrinkRows(NamedTuple):
    """The program's shrink rows (``_shrink_rows``; traced, (J,) each)."""

    slot: jax.Array  # the row's slot, clamped to >= 0
    rank_row: jax.Array
    live: jax.Array  # a listed row below its slot's rank for the program's weight
    a_rows: jax.Array  # its row in the A pool view, (J,) index of the loads


def _shrink_rows(shrink_refs, ranks_ref, layer_ref, w, ep: _Epilogue, *, interpret):
    """Where the program's shrink rows live in the A pool, computed once before the K loop."""
    a_ref, a_pages_ref, rows_ref = shrink_refs
    rows = jnp.arange(ep.shrink_rows, dtype=jnp.int32)
    slot = rows_ref[0, rows]
    rank_row = rows_ref[1, rows]
    # A slot outside the tables lists nothing (and is never used as an index).
    listed = (slot >= 0) & (slot < ranks_ref.shape[0])
    slot = jnp.where(listed, slot, 0)
    live = listed & (rank_row >= 0) & (rank_row < jnp.where(listed, ranks_ref[slot, w], 0))
    rank_row = jnp.maximum(rank_row, 0)
    layer = _layer(layer_ref, a_ref, ep.a_pages_per_pool, ep.rows_per_page)
    a_row = _pool_rows(
        a_pages_ref,
        slot,
        w,
        rank_row,
        layer,
        pages_per_pool=ep.a_pages_per_pool,
        rows_per_page=ep.rows_per_page,
        max_pages=ep.max_pages,
    )
    return _ShrinkRows(slot, rank_row, live, _idx(a_row, live, a_ref.shape[0], interpret))


def _shrink_epilogue(
    acc,
    v,
    refs,
    layer_ref,
    block,
    rows_i,
    row_ok,
    found: _ShrinkRows,
    ep: _Epilogue,
    *,
    dtype,
    interpret,
):
    """acc (bm, bn) + each token's scaled ``v @ B`` from the K loop's own shrink ``v`` (bm, J):
    one tensor-core dot of v, each token's row kept only in its own slot's columns and scaled,
    by the J rows' B rows (J, bn), each read once."""
    g_count = len(ep.weights)
    pool_refs = refs[:g_count]
    pages_ref, _, scales_ref, slot_ref = refs[g_count:]
    bn = acc.shape[1]
    group, col_block, w, pages = _program_weight(block, ep)
    slot = pltriton.load(slot_ref.at[rows_i], mask=row_ok, other=-1)
    scale = jnp.where(slot >= 0, scales_ref[jnp.maximum(slot, 0), w], 0.0)
    mine = (slot[:, None] == found.slot[None, :]) & found.live[None, :]
    vt = jnp.where(mine, v * scale[:, None], 0.0).astype(dtype)
    layer = _layer(layer_ref, pool_refs[0], ep.pages_per_pool[0], ep.rows_per_page)
    b_row = _pool_rows(
        pages_ref,
        found.slot,
        w,
        found.rank_row,
        layer,
        pages_per_pool=pages,
        rows_per_page=ep.rows_per_page,
        max_pages=ep.max_pages,
    )

    def run_group(acc, g):
        pool_ref = pool_refs[g]
        cols = pl.multiple_of(col_block * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
        cols_i = _idx(cols, cols >= 0, pool_ref.shape[1], interpret)[None, :]
        b_i = _idx(b_row, found.live, pool_ref.shape[0], interpret)[:, None]
        return _epilogue_dot(acc, pool_ref.at[b_i, cols_i], found.live, vt, dtype=dtype)

    return _in_program_group(acc, group, g_count, run_group)


def _matmul_kernel(
    # inputs
    x_ref,  # (T, K) activations
    w_ref,  # (L, K, N) base kernels of every layer
    layer_ref,  # (1,) int32
    # with ``bias``, then: the layer-stacked bias (L, N) (Qwen2's q|k|v)
    # with LoRA, then: v (T, G*MP*R) float32, or with the shrink in the K loop the A pool
    # (L*P*R, K), its pages (S, 7, MP) int32 and the shrink rows (2, J) int32; G B pools
    # (L*P_g*R, out_g) each; pages (S, 7, MP) int32; ranks (S, 7) int32; scales (S, 7) float32;
    # token slots (T,) int32
    *refs,
    # outputs: refs[-1] = y_ref (T, N), or (split, T, N) float32 partials when split > 1
    bm,
    sub,
    bn,
    bk,
    split,
    k_steps,
    dtype,
    expand: _Epilogue | None,
    interpret,
    bias: bool = False,
):
    """A program owns ``bm`` tokens x ``bn`` columns, as ``bm / sub`` sub-blocks of ``sub``
    tokens: each K step loads the weight tile once and runs one tensor-core dot per sub-block,
    and the epilogue runs per sub-block (its dot epilogue's v tile is ``(sub, K)``). With
    ``split`` > 1 it walks ``k_steps`` K steps from ``part * k_steps`` (part = program id 2) and
    writes its float32 partial; its epilogue adds the LoRA terms of its share. With
    ``expand.shrink_rows`` it also computes its tokens' v over its K steps (one more dot a step,
    by the listed A rank rows) and adds ``v @ B`` from that (a K part adds its partial v's).
    With ``bias`` (no split) it adds the layer's bias to its columns before the one rounding."""
    bias_ref = None
    if bias:
        bias_ref, *refs = refs
    y_ref = refs[-1]
    shrink_refs = None
    if expand is not None and expand.shrink_rows:
        shrink_refs, refs = refs[:3], refs[3:]
    num_tokens, width = x_ref.shape
    num_layers = w_ref.shape[0]
    part = pl.program_id(2) if split > 1 else None
    # Masks along K where the steps overrun it (the last step, or whole steps of the last part).
    mask_k = split * k_steps * bk != width if split > 1 else width % bk
    # Row blocks vary fastest: the programs of one column block run side by side, so a second
    # row block reads its weights from L2.
    j = pl.program_id(1)
    subs = []
    for s in range(bm // sub):
        start = pl.program_id(0) * bm if s == 0 else pl.program_id(0) * bm + s * sub
        rows = start + jnp.arange(sub, dtype=jnp.int32)
        row_ok = rows < num_tokens
        # The dot epilogue's indices recompute an only sub-block's start themselves.
        start = None if sub == bm else start
        subs.append((start, row_ok, _idx(rows, row_ok, num_tokens, interpret)))
    # Index arrays rather than pl.ds slices: the interpreter cannot mix slices with them, and
    # Triton sees the same contiguity from an aligned start plus a range.
    cols = pl.multiple_of(j * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)
    shrink = None
    if shrink_refs is not None:
        w_index = _program_weight(j, expand)[2]
        shrink = _shrink_rows(
            shrink_refs, refs[-4], layer_ref, w_index, expand, interpret=interpret
        )

    def body(kb, carry):
        accs, v_accs = carry
        if part is not None:
            kb = kb + part * k_steps
        k = pl.multiple_of(kb * bk, bk) + jnp.arange(bk, dtype=jnp.int32)
        if mask_k:
            k_ok = k < width
            k_i = _idx(k, k_ok, width, interpret)
            x_masks = [row_ok[:, None] & k_ok[None, :] for _, row_ok, _ in subs]
            wk = pltriton.load(
                w_ref.at[layer, k_i[:, None], cols[None, :]], mask=k_ok[:, None], other=0
            )
        else:
            k_i, x_masks = k, [row_ok[:, None] for _, row_ok, _ in subs]
            wk = w_ref[layer, k[:, None], cols[None, :]]
        if shrink is not None:
            a_mask = shrink.live[:, None] & k_ok[None, :] if mask_k else shrink.live[:, None]
            ak = pltriton.load(
                shrink_refs[0].at[shrink.a_rows[:, None], k_i[None, :]], mask=a_mask, other=0
            ).astype(dtype)
        out, v_out = [], []
        v_accs = v_accs or (None,) * len(subs)
        for (_, _, rows_i), x_mask, acc, v_acc in zip(subs, x_masks, accs, v_accs, strict=True):
            xk = pltriton.load(x_ref.at[rows_i[:, None], k_i[None, :]], mask=x_mask, other=0)
            xk = xk.astype(dtype)
            if shrink is not None:
                # The shrink dot before the base dot: Triton gives two dots of one loop body one
                # MMA layout, from the first it meets. From the square (32, 32) dot it split the
                # 4 warps along M over 2 row tiles of 16, so every tile's base dot ran twice: 96
                # HMMA a K step and warp at T = 32 instead of 48 (Triton 3.6 for sm_90,
                # scripts/kernel_report.py).
                v_out.append(
                    v_acc + pltriton.dot(xk, ak, trans_b=True, precision=_dot_precision(dtype))
                )
            out.append(acc + pltriton.dot(xk, wk.astype(dtype), precision=_dot_precision(dtype)))
        return tuple(out), tuple(v_out)

    prepared = [None] * len(subs)
    if shrink is None and expand is not None and expand.epilogue_k:
        # The epilogue's page-table gathers go out before the K loop: after it (lora_first
        # off) only the B and v loads remain; before it they are the terms' first loads.
        prepared = [
            _dot_epilogue_indices(
                refs[:-1], layer_ref, j, row_ok, expand, bm=sub, row0=start, interpret=interpret
            )
            for start, row_ok, _ in subs
        ]
    found = [None] * len(subs)
    if shrink is None and expand is not None and expand.adapters:
        # Which adapters each sub-block's tokens use, from its slots (loaded before the K loop).
        found = [
            _block_adapters(refs[-2], rows_i, row_ok, expand.adapters) for _, row_ok, rows_i in subs
        ]
    share = None if part is None else (part, split)

    def lora_terms(accs):
        """Each sub-block's accumulator plus its tokens' LoRA expand (v an input)."""
        out = []
        for (_, row_ok, rows_i), ready, few, acc in zip(subs, prepared, found, accs, strict=True):

            def general(acc, row_ok=row_ok, rows_i=rows_i, ready=ready):
                if ready is not None:
                    return _dot_epilogue(
                        acc,
                        refs[:-1],
                        rows_i,
                        ready,
                        expand,
                        dtype=dtype,
                        share=share,
                        interpret=interpret,
                    )
                return _expand_epilogue(
                    acc,
                    refs[:-1],
                    layer_ref,
                    j,
                    rows_i,
                    row_ok,
                    expand,
                    bn=bn,
                    share=share,
                    interpret=interpret,
                )

            def by_adapter(acc, rows_i=rows_i, few=few):
                return _adapters_epilogue(
                    acc,
                    refs[:-1],
                    layer_ref,
                    j,
                    rows_i,
                    few,
                    expand,
                    dtype=dtype,
                    share=share,
                    interpret=interpret,
                )

            if few is not None:
                acc = jax.lax.cond(few.every, by_adapter, general, acc)
            else:
                acc = general(acc)
            out.append(acc)
        return tuple(out)

    lora_first = shrink is None and expand is not None and expand.first
    initial = tuple(jnp.zeros((sub, bn), jnp.float32) for _ in subs)
    if lora_first:
        initial = lora_terms(initial)
    j_rows = shrink_refs[2].shape[1] if shrink is not None else 0
    accs, v_accs = jax.lax.fori_loop(
        0,
        k_steps,
        body,
        (
            initial,
            tuple(jnp.zeros((sub, j_rows), jnp.float32) for _ in subs if shrink is not None),
        ),
    )
    if shrink is None:
        v_accs = (None,) * len(subs)
    if shrink is None and expand is not None and not lora_first:
        accs = lora_terms(accs)
    for (_, row_ok, rows_i), acc, v_acc in zip(subs, accs, v_accs, strict=True):
        if shrink is not None:
            acc = _shrink_epilogue(
                acc,
                v_acc,
                refs[:-1],
                layer_ref,
                j,
                rows_i,
                row_ok,
                shrink,
                expand,
                dtype=dtype,
                interpret=interpret,
            )
        if bias_ref is not None:
            acc = acc + bias_ref[layer, cols].astype(jnp.float32)[None, :]
        out_idx = (rows_i[:, None], cols[None, :])
        if part is not None:
            out_idx = (part, *out_idx)
        pltriton.store(
            y_ref.at[out_idx],
            acc.astype(y_ref.dtype),
            mask=row_ok[:, None],
        )


def _expand_epilogue(
    acc, refs, layer_ref, block, rows_i, row_ok, ep: _Epilogue, *, bn, share=None, interpret
):
    """acc (bm, bn) + each token's scaled ``v @ B`` over the program's columns (one weight);
    with ``share`` = (part, split), the rank rows part, part + split, ... only."""
    part, split = share or (0, 1)
    weights, block_starts, rank_cols = ep.weights, ep.block_starts, ep.rank_cols
    pages_per_pool, rows_per_page, max_pages = ep.pages_per_pool, ep.rows_per_page, ep.max_pages
    g_count = len(weights)
    v_ref = refs[0]
    pool_refs = refs[1 : 1 + g_count]
    pages_ref, ranks_ref, scales_ref, slot_ref = refs[1 + g_count :]
    v_cols = v_ref.shape[1]
    slot = pltriton.load(slot_ref.at[rows_i], mask=row_ok, other=-1)
    has_adapter = row_ok & (slot >= 0)
    slot_c = jnp.maximum(slot, 0)
    for g, cb, in_group in _group_of_block(block, block_starts):
        w = weights[g]
        pool_ref = pool_refs[g]
        rank = jnp.where(has_adapter, ranks_ref[slot_c, w], 0)
        scale = jnp.where(has_adapter, scales_ref[slot_c, w], 0.0)
        # Only the program's own group runs any rank row: the others see no rows at all.
        steps = jnp.where(in_group, jnp.max(rank), 0)
        if share is not None:
            # Rows part + split * i below the block's largest rank (a non-negative quotient).
            steps = jax.lax.div(steps + (split - 1 - part), jnp.int32(split))
        cols = pl.multiple_of(cb * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
        cols_i = _idx(cols, in_group & (cols >= 0), pool_ref.shape[1], interpret)[None, :]
        layer_g = _layer(layer_ref, pool_ref, pages_per_pool[g], rows_per_page)

        def indices(row, pipelined, g=g, w=w, rank=rank, in_group=in_group, layer_g=layer_g):
            live = row < rank
            if pipelined:
                # Its loads go out whether or not the loop reaches the step: masked off beyond
                # each token's rank and outside the program's group.
                live = live & in_group
            b_row = _pool_rows(
                pages_ref,
                slot_c,
                w,
                row,
                layer_g,
                pages_per_pool=pages_per_pool[g],
                rows_per_page=rows_per_page,
                max_pages=max_pages,
            )
            return row, live, b_row

        def fetch(row, live, b_row, g=g, pool_ref=pool_ref, cols_i=cols_i):
            b_i = _idx(b_row, live, pool_ref.shape[0], interpret)[:, None]
            b = pltriton.load(pool_ref.at[b_i, cols_i], mask=live[:, None], other=0)
            vi = pltriton.load(
                v_ref.at[rows_i, _idx(g * rank_cols + row, live, v_cols, interpret)],
                mask=live,
                other=0.0,
            )
            return b, vi

        # The rank row as a vector: scalar index arithmetic on the loop counter mistypes in the
        # Triton lowering (i32 % i1).
        def row_of(i, ahead=0, rank=rank):
            # Vector arithmetic: scalar arithmetic on the loop counter mistypes (above).
            row = jnp.full(rank.shape, i, jnp.int32)
            row = row + ahead if ahead else row
            return row if share is None else row * split + part

        def body(i, acc, rank=rank, scale=scale, indices=indices, fetch=fetch, row_of=row_of):
            b, vi = fetch(*indices(row_of(i), False))
            return acc + (vi * scale)[:, None] * b.astype(jnp.float32)

        def pipelined(i, carry, scale=scale, indices=indices, fetch=fetch, row_of=row_of):
            acc, ahead, (b, vi) = carry
            after_next = indices(row_of(i, 2), True)
            loaded = fetch(*ahead)
            return acc + (vi * scale)[:, None] * b.astype(jnp.float32), after_next, loaded

        if not ep.prefetch_rows:
            acc = jax.lax.fori_loop(0, steps, body, acc)
            continue
        carry = (acc, indices(row_of(0, 1), True), fetch(*indices(row_of(0), True)))
        acc = jax.lax.fori_loop(0, steps, pipelined, carry)[0]
    return acc


def _program_weight(block, ep: _Epilogue):
    """(group index, column block inside the group, weight index, pages of its B pool) of the
    program's column block, as scalars: one set of indices whatever the group's size. Sums of
    steps rather than selects (a select of scalars mistypes in the Triton lowering)."""
    weights, block_starts, pages_per_pool = ep.weights, ep.block_starts, ep.pages_per_pool
    group, col_block, w, pages = 0, block, weights[0], pages_per_pool[0]
    for g in range(1, len(weights)):
        past = (block >= block_starts[g]).astype(jnp.int32)
        group = group + past
        col_block = col_block - past * (block_starts[g] - block_starts[g - 1])
        w = w + past * (weights[g] - weights[g - 1])
        pages = pages + past * (pages_per_pool[g] - pages_per_pool[g - 1])
    return group, col_block, w, pages


def _block_adapters(slot_ref, rows_i, row_ok, count):
    """The sub-block's first ``count`` adapter slots in ascending order (``_NO_MORE`` past its
    last) and whether they are all of its adapters; ``count`` reductions of the slot vector."""
    slot = pltriton.load(slot_ref.at[rows_i], mask=row_ok, other=-1)
    has_adapter = row_ok & (slot >= 0)
    adapters, below = [], -1
    for _ in range(count):
        below = jnp.min(jnp.where(has_adapter & (slot > below), slot, _NO_MORE))
        adapters.append(below)
    every = jnp.max(jnp.where(has_adapter, slot, -1)) <= below
    return _BlockAdapters(slot, has_adapter, tuple(adapters), every)


def _adapters_epilogue(
    acc, refs, layer_ref, block, rows_i, found, ep: _Epilogue, *, dtype, share=None, interpret
):
    """acc (bm, bn) + each token's scaled ``v @ B`` for a block with few adapters (``found``
    from ``_block_adapters``): per adapter and rank chunk of ``adapter_rank_rows``, one
    tensor-core dot of its tokens' scaled v, ``(bm, chunk)`` with every other token's row zero,
    by its B rows, ``(chunk, bn)``, read once. Chunks beyond the adapter's rank are skipped and
    rows beyond it masked (never loaded). With ``share`` = (part, split), the adapters part,
    part + split, ... only."""
    slot, has_adapter, adapters = found.slot, found.has_adapter, found.adapters
    weights, rank_cols = ep.weights, ep.rank_cols
    pages_per_pool, rows_per_page, max_pages = ep.pages_per_pool, ep.rows_per_page, ep.max_pages
    g_count = len(weights)
    v_ref = refs[0]
    pool_refs = refs[1 : 1 + g_count]
    pages_ref, ranks_ref, scales_ref, _ = refs[1 + g_count :]
    v_cols = v_ref.shape[1]
    bn = acc.shape[1]
    ur = ep.adapter_rank_rows
    group, col_block, w, pages = _program_weight(block, ep)
    layer = _layer(layer_ref, pool_refs[0], pages_per_pool[0], rows_per_page)
    slot_c = jnp.maximum(slot, 0)
    scale = jnp.where(has_adapter, scales_ref[slot_c, w], 0.0)
    chunk_rows = jnp.arange(ur, dtype=jnp.int32)

    def run_group(acc, g):
        pool_ref = pool_refs[g]
        cols = pl.multiple_of(col_block * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
        cols_i = _idx(cols, cols >= 0, pool_ref.shape[1], interpret)[None, :]
        for i, adapter in enumerate(adapters):
            # The adapter's slot and rank as vectors over the chunk's rows: scalar selects
            # mistype in the Triton lowering.
            u = jnp.full((ur,), adapter, jnp.int32)
            present = u < _NO_MORE
            u = jnp.where(present, u, 0)
            rank = jnp.where(present, ranks_ref[u, w], 0)
            mine = has_adapter & (slot == adapter)
            for rc in range(pl.cdiv(rank_cols, ur)):
                row = rc * ur + chunk_rows

                def step(acc, u=u, rank=rank, mine=mine, row=row):
                    live = row < rank
                    b_row = _pool_rows(
                        pages_ref,
                        u,
                        w,
                        row,
                        layer,
                        pages_per_pool=pages,
                        rows_per_page=rows_per_page,
                        max_pages=max_pages,
                    )
                    v_i = _idx(g * rank_cols + row, live, v_cols, interpret)[None, :]
                    return _add_epilogue_dot(
                        acc,
                        pool_ref.at[
                            _idx(b_row, live, pool_ref.shape[0], interpret)[:, None], cols_i
                        ],
                        live,
                        v_ref.at[rows_i[:, None], v_i],
                        mine[:, None] & live[None, :],
                        scale,
                        dtype=dtype,
                    )

                run = rc * ur < jnp.max(rank)
                if share is not None:
                    run = run & (share[0] == i % share[1])
                acc = jax.lax.cond(run, step, lambda acc: acc, acc)
        return acc

    return _in_program_group(acc, group, g_count, run_group)


def _add_epilogue_dot(acc, b_at, live, v_at, v_mask, scale, *, dtype):
    """``acc + (scale * v) @ B``, one tensor-core dot of an epilogue: ``b_at`` the B rows
    (K, bn) in their pool, masked off (never loaded) where not ``live``; ``v_at`` the v tile
    (bm, K) under ``v_mask``; ``scale`` per token (bm,)."""
    vt = pltriton.load(v_at, mask=v_mask, other=0.0)
    return _epilogue_dot(acc, b_at, live, (vt * scale[:, None]).astype(dtype), dtype=dtype)


def _epilogue_dot(acc, b_at, live, vt, *, dtype):
    """``acc + vt @ B`` for the scaled v tile ``vt`` (bm, K) in ``dtype`` and the B rows at
    ``b_at`` (K, bn), masked off (never loaded) where not ``live``."""
    b = pltriton.load(b_at, mask=live[:, None], other=0)
    return acc + pltriton.dot(vt, b.astype(dtype), precision=_dot_precision(dtype))


def _in_program_group(acc, group, g_count, run_group):
    """``run_group(acc, g)`` for the program's group only: each static g has its own pool ref,
    so a group of several weights branches on the traced ``group``."""
    if g_count == 1:
        return run_group(acc, 0)
    for g in range(g_count):
        acc = jax.lax.cond(group == g, functools.partial(run_group, g=g), lambda acc: acc, acc)
    return acc


def _dot_epilogue_indices(
    refs, layer_ref, block, row_ok, ep: _Epilogue, *, bm, row0=None, interpret
):
    """The dot epilogue's steps (static: every rank chunk of every token chunk of the block).
    Step s covers ``ct = epilogue_k / rank_rows`` tokens and ``rank_rows`` rank rows of each;
    per K position it needs the B row in the pool and whether it is live (the token has an
    adapter with that many rows of the program's weight). Those of the first
    ``prepared_rank_rows`` are computed here, before the K loop; the others by
    ``step_indices(tc, rc)`` inside their step. Returns (the program's group index, its column
    block in the group, its tokens' scales, the steps: (any row live, (B rows, live) or None),
    step_indices)."""
    weights, rank_cols = ep.weights, ep.rank_cols
    pages_per_pool, rows_per_page, max_pages = ep.pages_per_pool, ep.rows_per_page, ep.max_pages
    g_count = len(weights)
    pool_refs = refs[1 : 1 + g_count]
    pages_ref, ranks_ref, scales_ref, slot_ref = refs[1 + g_count :]
    num_tokens = slot_ref.shape[0]
    rr, ek = ep.rank_rows, ep.epilogue_k
    ct = ek // rr
    if row0 is None:  # the program's first (or only) sub-block
        row0 = pl.program_id(0) * bm
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    rows_i = _idx(rows, row_ok, num_tokens, interpret)
    slot = pltriton.load(slot_ref.at[rows_i], mask=row_ok, other=-1)
    has_adapter = row_ok & (slot >= 0)
    slot_c = jnp.maximum(slot, 0)
    # The program's weight of the group and its pool's geometry, as scalars: one set of indices
    # whatever the group's size. Sums of steps rather than selects (a select of scalars
    # mistypes in the Triton lowering). Every pool has the same layer count (checked).
    layer = _layer(layer_ref, pool_refs[0], pages_per_pool[0], rows_per_page)
    group, col_block, w, pages = _program_weight(block, ep)
    rank = jnp.where(has_adapter, ranks_ref[slot_c, w], 0)
    scale = jnp.where(has_adapter, scales_ref[slot_c, w], 0.0)
    max_rank = jnp.max(rank)
    kk = jnp.arange(ek, dtype=jnp.int32)

    def token_chunk(tc):
        token = tc * ct + kk // rr  # in the block
        token_ok = (token < bm) & (row0 + token < num_tokens)
        t_i = _idx(row0 + token, token_ok, num_tokens, interpret)
        k_slot = pltriton.load(slot_ref.at[t_i], mask=token_ok, other=-1)
        k_slot_c = jnp.maximum(k_slot, 0)
        k_rank = jnp.where(k_slot >= 0, ranks_ref[k_slot_c, w], 0)
        return token_ok, k_slot_c, k_rank

    def step_indices(tc, rc, chunk=None):
        token_ok, k_slot_c, k_rank = chunk if chunk is not None else token_chunk(tc)
        row = rc * rr + kk % rr
        live = token_ok & (row < k_rank)
        b_row = _pool_rows(
            pages_ref,
            k_slot_c,
            w,
            row,
            layer,
            pages_per_pool=pages,
            rows_per_page=rows_per_page,
            max_pages=max_pages,
        )
        return b_row, live

    prepared_chunks = ep.prepared_rank_rows // rr
    steps = []
    for tc in range(pl.cdiv(bm, ct)):
        chunk = token_chunk(tc) if prepared_chunks else None
        for rc in range(pl.cdiv(rank_cols, rr)):
            indices = step_indices(tc, rc, chunk) if rc < prepared_chunks else None
            steps.append((rc * rr < max_rank, indices))
    return group, col_block, scale, steps, step_indices


def _dot_epilogue(acc, refs, rows_i, prepared, ep: _Epilogue, *, dtype, share=None, interpret):
    """acc (bm, bn) + each token's scaled ``v @ B``, one tensor-core dot per prepared step: its
    B operand stacks the step's B rows, ``(epilogue_k, bn)``; its v operand is block-diagonal,
    ``(bm, epilogue_k)``, row t holding token t's scaled v in its own K positions and zeros
    elsewhere. Rows beyond a token's rank are masked in both (never loaded), so the pools may
    hold anything there; steps beyond every token's rank are skipped. With ``share`` = (part,
    split), the steps part, part + split, ... only."""
    group, col_block, scale, steps, step_indices = prepared
    weights, rank_cols = ep.weights, ep.rank_cols
    g_count = len(weights)
    v_ref = refs[0]
    pool_refs = refs[1 : 1 + g_count]
    v_cols = v_ref.shape[1]
    bm, bn = acc.shape
    rr, ek = ep.rank_rows, ep.epilogue_k
    ct = ek // rr
    kk = jnp.arange(ek, dtype=jnp.int32)
    block_rows = jnp.arange(bm, dtype=jnp.int32)
    n_rank_chunks = pl.cdiv(rank_cols, rr)

    def run_group(acc, g):
        pool_ref = pool_refs[g]
        cols = pl.multiple_of(col_block * bn, bn) + jnp.arange(bn, dtype=jnp.int32)
        cols_i = _idx(cols, cols >= 0, pool_ref.shape[1], interpret)[None, :]
        for s, (any_live, indices) in enumerate(steps):
            tc, rc = divmod(s, n_rank_chunks)
            token = tc * ct + kk // rr
            row = rc * rr + kk % rr

            def step(acc, indices=indices, tc=tc, rc=rc, token=token, row=row):
                b_row, live = indices if indices is not None else step_indices(tc, rc)
                own = (block_rows[:, None] == token[None, :]) & live[None, :]
                v_i = _idx(g * rank_cols + row, live, v_cols, interpret)[None, :]
                return _add_epilogue_dot(
                    acc,
                    pool_ref.at[_idx(b_row, live, pool_ref.shape[0], interpret)[:, None], cols_i],
                    live,
                    v_ref.at[rows_i[:, None], v_i],
                    own,
                    scale,
                    dtype=dtype,
                )

            if share is not None:
                any_live = any_live & (share[0] == s % share[1])
            acc = jax.lax.cond(any_live, step, lambda acc: acc, acc)
        return acc

    return _in_program_group(acc, group, g_count, run_group)


def lora_matmul(
    # inputs
    x: jax.Array,  # (T, K) activations
    w: jax.Array,  # (L, K, N) layer-stacked base kernels
    layer: jax.Array | int,  # () int32
    *,
    lora: LoraExpand | None = None,
    bias: jax.Array | None = None,  # (L, N) layer-stacked
    out_dtype=None,
    config: MatmulConfig | None = None,
    interpret: bool = False,
    partials: bool = False,
) -> jax.Array:  # (T, N) out_dtype (x's by default)
    """Pallas Triton ``x @ W[layer]`` with the LoRA expand fused; same contract as
    ``lora_matmul_reference``. ``partials=True``: the K split's float32 partials unsummed,
    (S, T, N), whose sum rounded to out_dtype is the output (S = 1 without a split: the output
    itself), for a consumer that sums them with its own work
    (``pallas_kernels.residual_norm``). ``bias`` (Qwen2's q|k|v): added to every token's row
    before the output's one rounding (in the epilogue; with a K split, to the partials' sum);
    not with ``partials``."""
    config = config or MatmulConfig()
    fn = "lora_matmul"
    if w.ndim != 3:
        raise ConfigError(
            f"{_WHERE} {fn}: w must be (L, K, N) stacked kernels, got shape {w.shape}"
        )
    num_layers, width, n_cols = w.shape
    if x.ndim != 2 or x.shape[1] != width:
        raise ConfigError(f"{_WHERE} {fn}: x must be (T, {width}) (w's K), got shape {x.shape}")
    num_tokens = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if bias is not None and (bias.shape != (num_layers, n_cols) or partials):
        raise ConfigError(
            f"{_WHERE} {fn}: bias must be (L, N) = ({num_layers}, {n_cols}) and come without "
            f"partials, got shape {bias.shape}, partials={partials}"
        )
    if num_tokens == 0:
        return jnp.zeros((1, 0, n_cols) if partials else (0, n_cols), out_dtype)
    widths = (n_cols,)
    args = [x, w, jnp.asarray(layer, jnp.int32).reshape(1)]
    expand = None
    if lora is not None:
        widths, expand, lora_args = _expand_operands(fn, lora, num_tokens, n_cols, width)
        args += lora_args
    bn = config.block_n_for(widths)
    if not bn:
        raise ConfigError(
            f"{_WHERE} {fn}: every output width {widths} must be a multiple of 16 "
            f"(a column block belongs to one weight)"
        )
    if expand is not None:
        block_starts = tuple(int(b) for b in np.cumsum([0] + [c // bn for c in widths]))
        expand = dataclasses.replace(expand, block_starts=block_starts)
    bm = config.block_m_for(num_tokens, expand=expand is not None)
    sub = config.dot_block_m_for(bm, expand=expand is not None)
    bk = max(16, min(config.block_k_for(num_tokens, bn), _next_pow2(width)))
    dtype = x.dtype if x.dtype == w.dtype and x.dtype.itemsize == 2 else jnp.dtype(jnp.float32)
    tag = ""
    if expand is not None and expand.shrink_rows:
        tag = f"_shrink{expand.shrink_rows}"
    elif expand is not None:
        tag = "_expand"
        if config.epilogue_for(sub) == "dot":
            rank_rows, epilogue_k, prepared = config.epilogue_blocks(sub, expand.rank_cols)
            expand = dataclasses.replace(
                expand, rank_rows=rank_rows, epilogue_k=epilogue_k, prepared_rank_rows=prepared
            )
            tag = f"_expand_r{rank_rows}k{epilogue_k}p{prepared}"
        elif config.epilogue_for(sub) == "rows_prefetch":
            expand = dataclasses.replace(expand, prefetch_rows=True)
            tag = "_expand_prefetch"
    block_adapters = config.epilogue_adapters_for(sub)
    if expand is not None and not expand.shrink_rows and block_adapters:
        adapter_rank_rows = max(16, min(config.adapter_rank_rows, _next_pow2(expand.rank_cols)))
        expand = dataclasses.replace(
            expand, adapters=block_adapters, adapter_rank_rows=adapter_rank_rows
        )
        tag += f"_a{block_adapters}"
    if expand is not None and not expand.shrink_rows and config.lora_first_for(sub):
        expand = dataclasses.replace(expand, first=True)
        tag += "_first"
    if sub < bm:
        tag += f"_d{sub}"
    grid = (pl.cdiv(num_tokens, bm), n_cols // bn)
    k_blocks = pl.cdiv(width, bk)
    rows_epilogue = expand is not None and not expand.epilogue_k and not expand.shrink_rows
    split = config.split_k_for(
        grid[0] * grid[1],
        k_blocks,
        rows_epilogue=rows_epilogue,
        partial_bytes=2 * 4 * num_tokens * n_cols,
        weight_bytes=width * n_cols * w.dtype.itemsize,
    )
    out_shape = jax.ShapeDtypeStruct((num_tokens, n_cols), out_dtype)
    if split > 1:
        tag += f"_sk{split}"
        grid += (split,)
        out_shape = jax.ShapeDtypeStruct((split, num_tokens, n_cols), jnp.float32)
    in_kernel_bias = bias is not None and split == 1
    if in_kernel_bias:
        args.insert(3, bias)
        tag += "_bias"
    num_warps = config.num_warps_for(bm, bn)
    name = f"lora_matmul{tag}_bm{bm}_bn{bn}_bk{bk}_w{num_warps}_s{config.num_stages}"
    y = pl.pallas_call(
        functools.partial(
            _matmul_kernel,
            bm=bm,
            sub=sub,
            bn=bn,
            bk=bk,
            split=split,
            k_steps=pl.cdiv(k_blocks, split),
            dtype=dtype,
            expand=expand,
            interpret=interpret,
            bias=in_kernel_bias,
        ),
        out_shape=out_shape,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if partials:
        return y if split > 1 else y[None]
    if split == 1:
        return y
    # One rounding of the summed partials, as the unsplit kernel rounds its accumulator.
    total = y.sum(axis=0)
    if bias is not None:
        total = total + bias[_layer_scalar(layer, num_layers)].astype(jnp.float32)
    return total.astype(out_dtype)


def lora_projection(
    # inputs
    x: jax.Array,  # (T, K) activations
    w: jax.Array,  # (L, K, N) layer-stacked base kernels of the group
    a_pool: jax.Array,  # (L, P, R, K)
    b_pools: tuple[jax.Array, ...],  # G pools (L, P, R, out_g), sum of out_g = N
    a_pages: jax.Array,  # (S, 7, MP) int32
    b_pages: jax.Array,  # (S, 7, MP) int32
    ranks: jax.Array,  # (S, 7) int32
    scales: jax.Array,  # (S, 7) float32
    token_slot: jax.Array,  # (T,) int32
    layer: jax.Array | int,  # () int32
    *,
    weights: tuple[int, ...],
    kernel_meta: dict | None = None,
    sgmv_config: SgmvConfig | None = None,
    config: MatmulConfig | None = None,
    interpret: bool = False,
    shrink_rows: jax.Array | None = None,  # (2, J) int32 (build_shrink_rows)
    per_token: bool = False,
    partials: bool = False,
    v: jax.Array | None = None,  # (T, G, MP*R) float32: the shrink, already run
    bias: jax.Array | None = None,  # (L, N) layer-stacked (lora_matmul's)
) -> jax.Array:  # (T, N) x's dtype; (S, T, N) with partials (lora_matmul's)
    """A projection group with LoRA in two launches (the model's entry point, as ``sgmv_delta``
    is for XLA's GEMMs): ``sgmv_shrink`` (with ``kernel_meta`` / ``sgmv_config``, and
    ``per_token`` as ``sgmv_shrink`` takes it), then ``lora_matmul`` with the expand in its
    epilogue. With ``shrink_rows`` (a step with few adapters) one launch: ``lora_matmul`` runs
    the shrink of those rank rows in its K loop. With ``v`` (the shrink's output, run by the
    launch before: ``pallas_kernels.residual_norm.residual_rms_norm_shrink``) one launch, the
    base GEMM and the expand."""
    shrink = None
    if v is not None:
        if shrink_rows is not None:
            raise ConfigError(
                f"{_WHERE} lora_projection: expected at most one of v (the shrink, already run) "
                f"and shrink_rows (the shrink in the K loop), got both"
            )
    elif shrink_rows is not None:
        shrink = LoraShrink(a_pool=a_pool, a_pages=a_pages, rows=shrink_rows)
    else:
        v = sgmv_shrink(
            x,
            a_pool,
            a_pages,
            ranks,
            token_slot,
            layer,
            weights=weights,
            kernel_meta=kernel_meta,
            config=sgmv_config,
            per_token=per_token,
            interpret=interpret,
        )
    expand = LoraExpand(
        v=v,
        b_pools=tuple(b_pools),
        b_pages=b_pages,
        ranks=ranks,
        scales=scales,
        token_slot=token_slot,
        weights=weights,
        shrink=shrink,
    )
    return lora_matmul(
        x,
        w,
        layer,
        lora=expand,
        bias=bias,
        config=config,
        interpret=interpret,
        partials=partials,
    )


def _expand_operands(fn, lora: LoraExpand, num_tokens: int, n_cols: int, width: int):
    """(the group's widths, the epilogue's statics, its operands) after checking them."""
    b_pools, widths = _check_b_pools(fn, lora.weights, lora.b_pools, prefix="lora.", where=_WHERE)
    if sum(widths) != n_cols:
        raise ConfigError(
            f"{_WHERE} {fn}: the group's widths {widths} add up to {sum(widths)}, "
            f"w has N = {n_cols} output columns"
        )
    shrink = lora.shrink
    if (lora.v is None) == (shrink is None):
        raise ConfigError(
            f"{_WHERE} {fn}: expected exactly one of lora.v (the shrink's output) and "
            f"lora.shrink (the shrink in the kernel), got "
            f"{'both' if shrink is not None else 'neither'}"
        )
    rank_cols = _check_expand_tables(
        fn,
        lora.v,
        b_pools,
        lora.b_pages,
        lora.ranks,
        lora.scales,
        lora.token_slot,
        num_tokens,
        prefix="lora.",
        where=_WHERE,
    )
    g_count = len(b_pools)
    rows_per_page = int(b_pools[0].shape[2])
    max_pages = int(lora.b_pages.shape[2])
    statics = _Epilogue(
        weights=lora.weights,
        block_starts=(),  # set once the column block is known
        rank_cols=rank_cols,
        pages_per_pool=tuple(int(p.shape[1]) for p in b_pools),
        rows_per_page=rows_per_page,
        max_pages=max_pages,
    )
    if shrink is None:
        operands = [lora.v.astype(jnp.float32).reshape(num_tokens, g_count * rank_cols)]
    else:
        statics = dataclasses.replace(
            statics,
            shrink_rows=_check_shrink(fn, shrink, lora.b_pages, b_pools, width),
            a_pages_per_pool=int(shrink.a_pool.shape[1]),
        )
        operands = [
            shrink.a_pool.reshape(-1, width),
            shrink.a_pages.astype(jnp.int32),
            shrink.rows.astype(jnp.int32),
        ]
    operands += [
        *(p.reshape(-1, p.shape[3]) for p in b_pools),
        lora.b_pages.astype(jnp.int32),
        lora.ranks.astype(jnp.int32),
        lora.scales.astype(jnp.float32),
        lora.token_slot.astype(jnp.int32),
    ]
    return widths, statics, operands


def _check_shrink(fn, shrink: LoraShrink, b_pages, b_pools, width: int) -> int:
    """The shrink rows J after checking ``lora.shrink`` against the B side and x's width."""
    _check_pool(fn, "lora.shrink.a_pool", shrink.a_pool, where=_WHERE)
    num_layers, _, rows_per_page, _ = b_pools[0].shape
    expected = (num_layers, shrink.a_pool.shape[1], rows_per_page, width)
    if shrink.a_pool.shape != expected:
        raise ConfigError(
            f"{_WHERE} {fn}: lora.shrink.a_pool must be (L, P, R, K) = {expected} (the B pools' "
            f"L and R, x's width), got shape {shrink.a_pool.shape}"
        )
    if shrink.a_pages.shape != b_pages.shape:
        raise ConfigError(
            f"{_WHERE} {fn}: lora.shrink.a_pages must be (S, 7, MP) = {b_pages.shape} like "
            f"lora.b_pages, got shape {shrink.a_pages.shape}"
        )
    rows = shrink.rows
    if rows.ndim != 2 or rows.shape[0] != 2 or rows.shape[1] < 16:
        raise ConfigError(
            f"{_WHERE} {fn}: lora.shrink.rows must be (2, J) int32 with J >= 16 (a tensor-core "
            f"dot dimension), got shape {rows.shape}"
        )
    for name, arr in (("a_pages", shrink.a_pages), ("rows", rows)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ConfigError(f"{_WHERE} {fn}: lora.shrink.{name} must be int32, got {arr.dtype}")
    return int(rows.shape[1])


__all__ = [
    "LoraExpand",
    "LoraShrink",
    "build_shrink_rows",
    "MatmulConfig",
    "lora_matmul",
    "lora_matmul_reference",
    "lora_projection",
]

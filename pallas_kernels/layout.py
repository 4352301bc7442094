"""The adapter page pool and the LoRA batch metadata: the contract between the host-side adapter
manager, the model's LoRA hook and the SGMV kernels.

Weights
-------
A LoRA adapter adds, for each targeted linear module m (in_m -> out_m) of each layer,
``y += scale_m * (x @ A_m) @ B_m`` with ``A_m: (in_m, r_m)`` and ``B_m: (r_m, out_m)``.
We store both factors as *rank-rows*: ``A_m`` as r_m rows of width in_m (that is PEFT's
``lora_A.weight`` as is) and ``B_m`` as r_m rows of width out_m (PEFT's ``lora_B.weight``
transposed). The seven modules are, in this fixed order (``MODULES``)::

    q_proj k_proj v_proj o_proj gate_proj up_proj down_proj

and every one is a *weight index* w in 0..6 of the metadata arrays below.

Pools
-----
Rank-rows live in pages. A page holds ``rows_per_page`` (R) rank-rows of one width. There is one
pool per *logical width axis* (``POOL_AXES``), shared by every factor whose rows have that width,
so the pools shard cleanly for tensor parallelism (Megatron split):

    ========== ======================= ==================================== =============
    pool       width                   factors stored there                 tp sharding
    ========== ======================= ==================================== =============
    embed      hidden_size             A_q A_k A_v A_gate A_up, B_o B_down   replicated
    heads      num_heads * head_dim    B_q, A_o                              split width
    kv_heads   num_kv_heads * head_dim B_k B_v                               split width
    mlp        intermediate_size       B_gate B_up, A_down                   split width
    ========== ======================= ==================================== =============

Each pool is one array ``(num_layers, pages_per_pool, R, width)``: the same page id addresses the
same rows in every layer (pool arrays are stacked over layers, as S-LoRA stacks its unified pool).
Each pool has its own page allocator on the host (``jaxlora.memory``). An adapter of rank r_m for
module m takes ``ceil(r_m / R)`` pages of the A pool and as many of the B pool for m: memory grows
with the real rank, never with the maximum. Rows of the last page beyond r_m are masked by the
kernels (never read as weights), so a page that previously held another adapter needs no clearing.

Slots and metadata
------------------
A step references at most ``max_slots`` (S) resident adapters through *slots*. All metadata is
int32 (scales float32) with static shapes, built on the host (``build_slot_metadata``):

    token_slot      (T,)            slot of each token; NO_ADAPTER (-1) = base model only
    a_pages         (S, 7, MP)      page id, in the A pool of weight w, of the slot's i-th page
    b_pages         (S, 7, MP)      page id, in the B pool of weight w
    ranks           (S, 7)          r of weight w for the slot; 0 = weight not targeted
    scales          (S, 7) float32  alpha/r (or alpha/sqrt(r)) of weight w for the slot

MP = ceil(max_rank / R). Unused page-table entries are 0 (a valid page id that is never read,
because the rank masks it). Kernels may derive more metadata (token order, tiles) from these arrays;
that derivation lives beside each kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
MODULE_INDEX: dict[str, int] = {m: i for i, m in enumerate(MODULES)}
NO_ADAPTER = -1

POOL_AXES: tuple[str, ...] = ("embed", "heads", "kv_heads", "mlp")

# (pool of the A rows, pool of the B rows) of each module.
MODULE_POOLS: dict[str, tuple[str, str]] = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}

# Modules that share one input and so one shrink launch (and one expand launch into column slices
# of the fused output).
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def pool_widths(
    hidden_size: int, q_size: int, kv_size: int, intermediate_size: int
) -> dict[str, int]:
    return {"embed": hidden_size, "heads": q_size, "kv_heads": kv_size, "mlp": intermediate_size}


def pages_for_rank(rank: int, rows_per_page: int) -> int:
    return -(-rank // rows_per_page)


def pool_pages_needed(module_ranks, rows_per_page: int) -> dict[str, int]:
    """Pages an adapter of these ranks (module name -> r; 0 or absent: not targeted) takes in
    each pool: ceil(r / R) for its A rows and as many for its B rows, in their modules' pools."""
    need = dict.fromkeys(POOL_AXES, 0)
    for module, rank in module_ranks.items():
        for axis in MODULE_POOLS[module]:
            need[axis] += pages_for_rank(rank, rows_per_page)
    return need


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    """One resident adapter as the kernels see it: per weight, its rank, scale and page ids."""

    ranks: tuple[int, ...]  # (7,)
    scales: tuple[float, ...]  # (7,)
    a_pages: tuple[tuple[int, ...], ...]  # 7 tuples of page ids in the A pool of each weight
    b_pages: tuple[tuple[int, ...], ...]  # 7 tuples of page ids in the B pool of each weight


def build_slot_metadata(
    slots: list[SlotInfo | None], *, max_slots: int, max_rank: int, rows_per_page: int
) -> dict[str, np.ndarray]:
    """Packs resident adapters into the (S, 7, MP) / (S, 7) arrays described above.

    ``slots[i]`` is the adapter in slot i (None: empty slot, rank 0 everywhere).
    """
    if len(slots) > max_slots:
        raise ValueError(f"{len(slots)} slots given; at most max_slots={max_slots}")
    mp = pages_for_rank(max_rank, rows_per_page)
    n = len(MODULES)
    a_pages = np.zeros((max_slots, n, mp), np.int32)
    b_pages = np.zeros((max_slots, n, mp), np.int32)
    ranks = np.zeros((max_slots, n), np.int32)
    scales = np.zeros((max_slots, n), np.float32)
    for s, info in enumerate(slots):
        if info is None:
            continue
        try:
            rows = _slot_rows(info, max_rank, rows_per_page)
        except ValueError as e:
            raise ValueError(f"slot {s} {e}") from None
        ranks[s], scales[s], a_pages[s], b_pages[s] = rows
    return {"a_pages": a_pages, "b_pages": b_pages, "ranks": ranks, "scales": scales}


@functools.lru_cache(maxsize=8192)
def _slot_rows(info: SlotInfo, max_rank: int, rows_per_page: int):
    """One adapter's rows of the slot arrays. The engine packs the same resident adapters step
    after step: their rows are checked and built once (SlotInfo is immutable)."""
    mp = pages_for_rank(max_rank, rows_per_page)
    n = len(MODULES)
    a_pages = np.zeros((n, mp), np.int32)
    b_pages = np.zeros((n, mp), np.int32)
    ranks = np.zeros(n, np.int32)
    scales = np.zeros(n, np.float32)
    for w in range(n):
        r = info.ranks[w]
        if r > max_rank:
            raise ValueError(f"weight {MODULES[w]}: rank {r} > max_rank {max_rank}")
        need = pages_for_rank(r, rows_per_page)
        if len(info.a_pages[w]) != need or len(info.b_pages[w]) != need:
            raise ValueError(
                f"weight {MODULES[w]}: rank {r} needs {need} pages, "
                f"got {len(info.a_pages[w])} (A) / {len(info.b_pages[w])} (B)"
            )
        ranks[w] = r
        scales[w] = info.scales[w] if r else 0.0
        a_pages[w, :need] = info.a_pages[w]
        b_pages[w, :need] = info.b_pages[w]
    for array in (ranks, scales, a_pages, b_pages):
        array.flags.writeable = False  # shared by every later step
    return ranks, scales, a_pages, b_pages

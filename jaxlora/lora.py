"""Host-side LoRA weights and the device-side inputs of the model's LoRA hook.

``LoraWeights`` is one adapter in host memory, already in the rank-row layout of the page pool
(pallas_kernels/layout.py). ``LoraInputs`` is what one forward pass receives: the page pools, the
slot metadata and each token's slot. ``pack_adapters`` lays a few adapters into fresh pools, for
tests, offline generation and evaluation; the serving engine uses jaxlora.memory instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.errors import AdapterError, PoolExhaustedError
from pallas_kernels import layout
from pallas_kernels.layout import MODULE_POOLS, MODULES, NO_ADAPTER, SlotInfo


@dataclasses.dataclass
class LoraWeights:
    """One adapter in host memory.

    a[m]: (num_layers, r_m, in_m) rank-rows of A (PEFT lora_A.weight per layer);
    b[m]: (num_layers, r_m, out_m) rank-rows of B (PEFT lora_B.weight transposed);
    scales[m]: the factor applied to (x @ A) @ B. Modules the adapter does not target are absent.
    Where PEFT patterns give layers different ranks, rows beyond a layer's own rank are zero and
    where they give layers different scales, B rows carry the ratio to scales[m].
    """

    name: str
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    scales: dict[str, float]
    source: str = ""

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(self.a[m].shape[1]) for m in self.a}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.a.values()) + sum(x.nbytes for x in self.b.values())

    def pages_needed(self, rows_per_page: int) -> dict[str, int]:
        """Pages this adapter takes in each pool."""
        return layout.pool_pages_needed(self.ranks, rows_per_page)


def random_lora_weights(
    config: ModelConfig,
    name: str,
    rank: int,
    modules=MODULES,
    *,
    seed: int = 0,
    std: float = 0.3,
    scale: float = 0.5,
    dtype=np.float32,
) -> LoraWeights:
    """An adapter with random non-zero A and B (benchmarks, demos, tests)."""
    rng = np.random.default_rng(seed)
    shapes = config.module_shapes()
    a, b = {}, {}
    for m in modules:
        fan_in, fan_out = shapes[m]
        a[m] = rng.normal(0, std, (config.num_layers, rank, fan_in)).astype(dtype)
        b[m] = rng.normal(0, std, (config.num_layers, rank, fan_out)).astype(dtype)
    return LoraWeights(name=name, a=a, b=b, scales={m: scale for m in modules})


def _check_merge_parts(parts: Sequence[tuple[LoraWeights, float]], name: str) -> None:
    """AdapterError for a merge of no parts or a weight that is not a finite number (within
    float32's range, the merge's arithmetic)."""
    if not parts:
        raise AdapterError(f"merge {name!r}: expected at least one (adapter, weight), got none")
    limit = float(np.finfo(np.float32).max)
    for weights, weight in parts:
        if (
            not isinstance(weight, (int, float, np.integer, np.floating))
            or isinstance(weight, bool)
            or not abs(float(weight)) <= limit
        ):
            raise AdapterError(
                f"merge {name!r}: weight of adapter {weights.name!r} is {weight!r}; expected a "
                f"finite number of at most {limit:.4g} in magnitude"
            )


def merge_lora_weights(
    parts: Sequence[tuple[LoraWeights, float]], name: str, *, max_rank: int | None = None
) -> LoraWeights:
    """The adapter whose update is the weighted sum of the parts' updates, exactly (PEFT's
    ``add_weighted_adapter(combination_type="cat")``): each module's rank-rows are the parts'
    rows side by side (its rank is the sum of theirs) and each part's B rows are multiplied by
    weight * its scale / the module's scale (the first non-zero one of the parts'). float32;
    raises AdapterError for no parts, a weight that is not a finite number, or (given max_rank)
    a module whose summed rank would pass it."""
    _check_merge_parts(parts, name)
    a, b, scales = {}, {}, {}
    for m in MODULES:
        targeting = [(w, float(weight)) for w, weight in parts if m in w.a]
        if not targeting:
            continue
        # (a part of scale 0 adds nothing, whatever the module's scale)
        scales[m] = next((float(w.scales[m]) for w, _ in targeting if w.scales[m]), 0.0)
        rank = sum(w.a[m].shape[1] for w, _ in targeting)
        if max_rank is not None and rank > max_rank:
            ranks = " + ".join(str(w.a[m].shape[1]) for w, _ in targeting)
            raise AdapterError(
                f"merge {name!r}: module {m!r} would have rank {rank} ({ranks}); expected at "
                f"most {max_rank} (the pool's max_rank)"
            )
        a[m] = np.concatenate([np.asarray(w.a[m], np.float32) for w, _ in targeting], axis=1)
        factors = [
            weight * w.scales[m] / scales[m] if scales[m] else 0.0 for w, weight in targeting
        ]
        b[m] = np.concatenate(
            [
                np.asarray(w.b[m], np.float32) * np.float32(factor)
                for (w, _), factor in zip(targeting, factors, strict=True)
            ],
            axis=1,
        )
    sources = ", ".join(f"{weight:g} x {w.name}" for w, weight in parts)
    return LoraWeights(name=name, a=a, b=b, scales=scales, source=f"merge of {sources}")


# LoRAX's per-request merge strategies (its MergeStrategy enum, lower case) and sign methods.
PARAMETER_MERGES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _pruned(t: np.ndarray, density: float, method: str, rng: np.random.Generator) -> np.ndarray:
    """PEFT's (and LoRAX's) pruning of one task tensor: "magnitude" keeps its
    int(density * size) largest absolute values; "random" keeps each value with probability
    density and divides the kept ones by density (DARE's rescale)."""
    if density >= 1:
        return t
    if density <= 0:
        return np.zeros_like(t)
    if method == "magnitude":
        flat = t.reshape(-1)
        k = int(density * flat.size)
        keep = np.zeros(flat.size, bool)
        if k:
            keep[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
        return np.where(keep, flat, 0).reshape(t.shape).astype(t.dtype)
    kept = rng.random(t.shape) < density
    return np.where(kept, t / np.float32(density), 0).astype(t.dtype)


def _merged_tensor(
    tensors: list[np.ndarray],
    weights: np.ndarray,
    strategy: str,
    density: float,
    majority_sign_method: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """One tensor of LoRAX's merge from the parts' same-shaped tensors."""
    if strategy == "linear":
        stacked = np.stack(tensors)
    else:
        method = "magnitude" if strategy == "ties" else "random"
        stacked = np.stack([_pruned(t, density, method, rng) for t in tensors])
    w = weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if strategy in ("linear", "dare_linear"):
        return (stacked * w).sum(axis=0)
    # TIES: each value keeps the parts whose sign is the majority's (by total magnitude or by
    # count), weighted, averaged over those parts.
    sign = np.sign(stacked)
    elected = stacked.sum(axis=0) if majority_sign_method == "total" else sign.sum(axis=0)
    agrees = sign == np.where(elected >= 0, 1, -1)[None]
    kept = (stacked * w * agrees).sum(axis=0)
    return kept / np.maximum(agrees.sum(axis=0), 1).astype(np.float32)


def merge_lora_parameters(
    parts: Sequence[tuple[LoraWeights, float]],
    name: str,
    *,
    strategy: str = "linear",
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> LoraWeights:
    """LoRAX's per-request merge (``merged_adapters``): each module's A and B are merged apart,
    tensor by tensor (one layer's A or B), from the parts that target the module, with their
    weights: "linear" sums them weighted; "ties" keeps each tensor's int(density * size)
    largest values, elects each value's sign (``majority_sign_method`` "total": of the summed
    values; "frequency": of the signs' count) and averages the weighted values of that sign;
    "dare_linear" / "dare_ties" drop each value with probability 1 - density (drawn from
    ``seed``) and divide the kept ones by density, then sum / elect as above. The parts must
    have one rank per module (LoRAX merges adapters of one rank); the merged adapter takes the
    first part's scale (LoRAX keeps the first adapter's config), for a module the first part
    does not target its first module's. Unlike ``merge_lora_weights`` this is not the sum of
    the parts' updates (B_1 A_1 + B_2 A_2): it is (B_1 + B_2)(A_1 + A_2), LoRAX's. float32;
    AdapterError for no parts, a weight that is not a finite number, unknown strategy or sign
    method, density outside [0, 1] (0: TIES and DARE keep nothing; "linear" ignores it), or
    different ranks of one module."""
    _check_merge_parts(parts, name)
    where = f"merge {name!r}"
    if strategy not in PARAMETER_MERGES:
        raise AdapterError(
            f"{where}: merge_strategy {strategy!r}; expected one of {', '.join(PARAMETER_MERGES)}"
        )
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise AdapterError(
            f"{where}: majority_sign_method {majority_sign_method!r}; expected one of "
            f"{', '.join(MAJORITY_SIGN_METHODS)}"
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise AdapterError(f"{where}: density {density!r}; expected a number in [0, 1]")
    first = parts[0][0]
    first_scale = next(iter(first.scales.values()), 0.0)
    rng = np.random.default_rng(seed)
    a, b, scales = {}, {}, {}
    for m in MODULES:
        targeting = [(w, float(weight)) for w, weight in parts if m in w.a]
        if not targeting:
            continue
        ranks = sorted({int(w.a[m].shape[1]) for w, _ in targeting})
        if len(ranks) > 1:
            raise AdapterError(
                f"{where}: module {m!r} has ranks {ranks} among the adapters; expected one "
                "rank (LoRAX merges adapters of one rank)"
            )
        weights = np.asarray([weight for _, weight in targeting], np.float32)
        merged = {}
        for side in ("a", "b"):
            stacked = [np.asarray(getattr(w, side)[m], np.float32) for w, _ in targeting]
            merged[side] = np.stack(
                [
                    _merged_tensor(
                        [t[layer] for t in stacked],
                        weights,
                        strategy,
                        float(density),
                        majority_sign_method,
                        rng,
                    )
                    for layer in range(stacked[0].shape[0])
                ]
            ).astype(np.float32)
        a[m], b[m] = merged["a"], merged["b"]
        scales[m] = float(first.scales.get(m, first_scale))
    sources = ", ".join(f"{weight:g} x {w.name}" for w, weight in parts)
    return LoraWeights(
        name=name,
        a=a,
        b=b,
        scales=scales,
        source=f"{strategy} merge of {sources}"
        + ("" if strategy == "linear" else f" (density {density:g})"),
    )


LORA_UPDATES = ("in_place", "delta")


@flax.struct.dataclass
class LoraInputs:
    """Device-side inputs of the LoRA hook for one forward pass."""

    pools: dict[str, jax.Array]  # POOL_AXES -> (L, P, R, width)
    a_pages: jax.Array  # (S, 7, MP) int32
    b_pages: jax.Array  # (S, 7, MP) int32
    ranks: jax.Array  # (S, 7) int32
    scales: jax.Array  # (S, 7) float32
    token_slot: jax.Array  # (T,) or (B, S) int32, NO_ADAPTER = base model
    # Extra int32 arrays the Pallas kernels derive from token_slot on the host
    # (pallas_kernels.sgmv.build_sgmv_metadata); None on the reference path.
    kernel_meta: dict[str, jax.Array] | None = None
    # (2, J) int32 (pallas_kernels.lora_matmul.build_shrink_rows): a step with few adapters
    # runs the shrink of these rank rows inside lora_matmul (None: the SGMV shrink).
    shrink_rows: jax.Array | None = None
    # "reference": gather + einsum in jnp; "pallas": the SGMV kernels; "pallas_interpret": the
    # kernels in interpret mode (CPU tests).
    impl: str = flax.struct.field(pytree_node=False, default="reference")
    # The kernels' tuning (pallas_kernels.sgmv.SgmvConfig; None: its defaults). kernel_meta
    # must be built with the same one.
    sgmv_config: object = flax.struct.field(pytree_node=False, default=None)
    # The SGMV kernels' ``per_token`` argument (pallas_kernels.sgmv.choose_per_token decides it
    # on the host from the step's adapters): one program per token wherever T would take the
    # tiles.
    per_token: bool = flax.struct.field(pytree_node=False, default=False)
    # How the kernels update an output computed by XLA's GEMM (LORA_UPDATES; RunnerConfig.
    # lora_update): "in_place" (sgmv_apply) or "delta" (sgmv_delta, added by XLA).
    update: str = flax.struct.field(pytree_node=False, default="delta")

    def sgmv_kwargs(self) -> dict:
        """The SGMV kernels' keyword arguments of this pass (metadata, config, per token,
        interpret mode): ``sgmv_apply`` / ``sgmv_delta`` take them as they are."""
        return dict(
            kernel_meta=self.kernel_meta,
            config=self.sgmv_config,
            per_token=self.per_token,
            interpret=self.impl == "pallas_interpret",
        )

    def with_tokens(self, token_slot: jax.Array) -> LoraInputs:
        return self.replace(token_slot=token_slot)


def empty_pools(
    config: ModelConfig, pool: LoraPoolConfig, dtype=jnp.float32
) -> dict[str, np.ndarray]:
    widths = layout.pool_widths(
        config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    )
    return {
        axis: np.zeros(
            (config.num_layers, pool.pages_in(axis), pool.rows_per_page, w), dtype=jnp.dtype(dtype)
        )
        for axis, w in widths.items()
    }


def write_adapter_rows(
    pools: dict[str, np.ndarray],
    weights: LoraWeights,
    pages: dict[str, list[int]],
    rows_per_page: int,
) -> SlotInfo:
    """Copies an adapter's rank-rows into the given pages (host numpy pools) and returns the slot.

    pages[axis] lists the page ids, in the order the adapter's weights take them (MODULES order,
    A before B within a module when both use the pool).
    """
    cursor = {axis: 0 for axis in layout.POOL_AXES}
    ranks, scales, a_pages, b_pages = [], [], [], []
    for m in MODULES:
        if m not in weights.a:
            ranks.append(0)
            scales.append(0.0)
            a_pages.append(())
            b_pages.append(())
            continue
        r = weights.a[m].shape[1]
        n = layout.pages_for_rank(r, rows_per_page)
        taken = []
        for axis, rows in zip(MODULE_POOLS[m], (weights.a[m], weights.b[m]), strict=True):
            ids = pages[axis][cursor[axis] : cursor[axis] + n]
            cursor[axis] += n
            for i, page in enumerate(ids):
                chunk = rows[:, i * rows_per_page : (i + 1) * rows_per_page, :]
                pools[axis][:, page, : chunk.shape[1], :] = chunk
            taken.append(tuple(ids))
        ranks.append(r)
        scales.append(float(weights.scales[m]))
        a_pages.append(taken[0])
        b_pages.append(taken[1])
    return SlotInfo(
        ranks=tuple(ranks), scales=tuple(scales), a_pages=tuple(a_pages), b_pages=tuple(b_pages)
    )


def pack_adapters(
    config: ModelConfig,
    adapters: list[LoraWeights],
    pool: LoraPoolConfig | None = None,
    dtype=jnp.float32,
    impl: str = "reference",
) -> LoraInputs:
    """Lays adapters into fresh pools (slot i = adapters[i]); token_slot is left empty.

    Pages are handed out in a shuffled order so that nothing relies on contiguous page ids.
    """
    pool = pool or LoraPoolConfig(max_slots=max(1, len(adapters)))
    pools = empty_pools(config, pool, dtype)
    rng = np.random.default_rng(0)
    free = {axis: list(rng.permutation(pool.pages_in(axis))) for axis in layout.POOL_AXES}
    slots = []
    for w in adapters:
        need = w.pages_needed(pool.rows_per_page)
        pages = {}
        for axis, n in need.items():
            if n > len(free[axis]):
                raise PoolExhaustedError(
                    f"pack_adapters: pool {axis!r} has {len(free[axis])} free pages, adapter "
                    f"{w.name!r} needs {n} (raise LoraPoolConfig.pages_per_pool or its axis_pages)"
                )
            pages[axis], free[axis] = [int(p) for p in free[axis][:n]], free[axis][n:]
        slots.append(write_adapter_rows(pools, w, pages, pool.rows_per_page))
    meta = layout.build_slot_metadata(
        slots, max_slots=pool.max_slots, max_rank=pool.max_rank, rows_per_page=pool.rows_per_page
    )
    return LoraInputs(
        pools={k: jnp.asarray(v) for k, v in pools.items()},
        a_pages=jnp.asarray(meta["a_pages"]),
        b_pages=jnp.asarray(meta["b_pages"]),
        ranks=jnp.asarray(meta["ranks"]),
        scales=jnp.asarray(meta["scales"]),
        token_slot=jnp.full((0,), NO_ADAPTER, jnp.int32),
        impl=impl,
    )

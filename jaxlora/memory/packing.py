"""An adapter in the page layout of the pool (pallas_kernels/layout.py), ready to copy.

``AdapterFootprint`` is what the header of an adapter tells (rank and scale of each module) and
what the pool needs to know before any weight is read: how many pages each pool gives it and the
order those pages take. ``PackedAdapter`` adds the rank-rows themselves, already cut into pages:
for each pool axis the adapter uses, one array ``(num_layers, pages, rows_per_page, width)`` whose
page i goes to the i-th page id allocated in that pool. The page count of each array is rounded up
to a *bucket* (1, 2, 3, 4, 6, 8, 12, 16, ...: at most a third more) so that the jitted copy into
the pool compiles for a handful of shapes only; the padding pages are never written to the pool.
The page order is the one of
``jaxlora.lora.write_adapter_rows`` (MODULES order, A before B within a module), so a
``SlotInfo`` built here feeds ``layout.build_slot_metadata`` unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlora.config import ModelConfig, is_finite_number
from jaxlora.errors import AdapterError
from jaxlora.lora import LoraWeights
from pallas_kernels import layout
from pallas_kernels.layout import MODULE_POOLS, MODULES, POOL_AXES, SlotInfo


@dataclasses.dataclass(frozen=True)
class AdapterFootprint:
    """Rank and scale of each of the 7 weights (MODULES order; rank 0 = not targeted)."""

    ranks: tuple[int, ...]
    scales: tuple[float, ...]

    @classmethod
    def from_modules(cls, ranks: dict[str, int], scales: dict[str, float]) -> AdapterFootprint:
        return cls(
            ranks=tuple(int(ranks.get(m, 0)) for m in MODULES),
            scales=tuple(float(scales[m]) if ranks.get(m, 0) else 0.0 for m in MODULES),
        )

    @classmethod
    def of_weights(cls, weights: LoraWeights) -> AdapterFootprint:
        return cls.from_modules(weights.ranks, weights.scales)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def pages_needed(self, rows_per_page: int) -> dict[str, int]:
        """Pages taken in each pool (equals LoraWeights.pages_needed)."""
        return layout.pool_pages_needed(dict(zip(MODULES, self.ranks, strict=True)), rows_per_page)

    def slot_info(self, pages: dict[str, list[int]], rows_per_page: int) -> SlotInfo:
        """The slot of an adapter whose pages in each pool are ``pages[axis]`` (in the order the
        packed blocks hold them)."""
        cursor = dict.fromkeys(POOL_AXES, 0)
        a_pages, b_pages = [], []
        for m, r in zip(MODULES, self.ranks, strict=True):
            n = layout.pages_for_rank(r, rows_per_page)
            taken = []
            for axis in MODULE_POOLS[m]:
                taken.append(tuple(int(p) for p in pages[axis][cursor[axis] : cursor[axis] + n]))
                cursor[axis] += n
            a_pages.append(taken[0])
            b_pages.append(taken[1])
        return SlotInfo(
            ranks=self.ranks, scales=self.scales, a_pages=tuple(a_pages), b_pages=tuple(b_pages)
        )


def page_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= n."""
    size = 1
    while size < n:
        if size >= 2 and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
    return size


def packed_nbytes(
    footprint: AdapterFootprint, config: ModelConfig, rows_per_page: int, dtype
) -> int:
    """Bytes of the packed form (pages hold rows_per_page rows, page counts are bucketed)."""
    widths = layout.pool_widths(
        config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    )
    itemsize = np.dtype(dtype).itemsize
    return sum(
        page_bucket(n) * config.num_layers * rows_per_page * widths[axis] * itemsize
        for axis, n in footprint.pages_needed(rows_per_page).items()
        if n
    )


@dataclasses.dataclass(frozen=True, eq=False)
class PackedAdapter:
    """An adapter's rank-rows cut into pages: blocks[axis] is (num_layers, bucketed pages, R,
    width), for the axes where the adapter has pages; a numpy array, or a jax.Array in host
    memory (``pinned_host``) when the store is configured so."""

    footprint: AdapterFootprint
    blocks: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


def validate_weights(
    weights: LoraWeights, config: ModelConfig, *, max_rank: int, source: str
) -> None:
    """Checks an in-memory adapter against the base model; raises AdapterError naming the
    tensor and the expected shape."""
    shapes = config.module_shapes()
    where = f"adapter {weights.name!r} ({source})"
    for field in ("a", "b", "scales"):
        # (LoraWeights is a plain dataclass: nothing checked these when it was built)
        if not isinstance(getattr(weights, field), Mapping):
            raise AdapterError(
                f"{where}: field {field!r} is {getattr(weights, field)!r:.100}; expected a dict "
                "of module name to " + ("scale" if field == "scales" else "array")
            )
    unknown = (set(weights.a) | set(weights.b)) - set(MODULES)
    if unknown:
        raise AdapterError(
            f"{where}: modules {sorted(unknown)} are not LoRA targets; expected a "
            f"subset of {list(MODULES)}"
        )
    if set(weights.a) != set(weights.b):
        raise AdapterError(
            f"{where}: modules with A {sorted(weights.a)} and with B "
            f"{sorted(weights.b)} differ; every targeted module needs both"
        )
    for m in weights.a:
        fan_in, fan_out = shapes[m]
        for factor in ("a", "b"):
            _check_rows(getattr(weights, factor)[m], f"{where}: tensor {factor}[{m!r}]")
        a, b = np.asarray(weights.a[m]), np.asarray(weights.b[m])
        if a.ndim != 3 or a.shape[0] != config.num_layers or a.shape[2] != fan_in:
            raise AdapterError(
                f"{where}: tensor a[{m!r}] has shape {a.shape}; expected "
                f"({config.num_layers}, rank, {fan_in})"
            )
        rank = a.shape[1]
        if b.shape != (config.num_layers, rank, fan_out):
            raise AdapterError(
                f"{where}: tensor b[{m!r}] has shape {b.shape}; expected "
                f"({config.num_layers}, {rank}, {fan_out})"
            )
        if not 1 <= rank <= max_rank:
            raise AdapterError(
                f"{where}: module {m!r} has rank {rank}; expected 1..{max_rank} "
                "(the pool's max_rank)"
            )
        scale = weights.scales.get(m)
        # (a 0-d numpy or JAX array is its number: alpha / jnp.sqrt(rank) gives one)
        if not is_finite_number(scale.item() if getattr(scale, "shape", None) == () else scale):
            raise AdapterError(f"{where}: scales[{m!r}] is {scale!r}; expected a finite number")
        for factor, rows in (("a", a), ("b", b)):
            bad = ~np.isfinite(rows)
            if bad.any():
                raise AdapterError(
                    f"{where}: tensor {factor}[{m!r}] holds {int(bad.sum())} NaN or infinite "
                    f"values (the first at layer {int(np.argwhere(bad)[0][0])}); expected "
                    "finite weights"
                )
    if not weights.a:
        raise AdapterError(f"{where}: targets no module; expected at least one of {list(MODULES)}")


def _check_rows(rows, where: str) -> None:
    """AdapterError unless rows is an array of real floating-point values: integers or bools
    are no LoRA weights (token ids passed by mistake, say), the cast to the pool would drop a
    complex array's imaginary part, and an object array fails inside numpy."""
    import jax

    if not (hasattr(rows, "shape") and hasattr(rows, "dtype")):
        raise AdapterError(f"{where} is a {type(rows).__name__}; expected a numpy or JAX array")
    try:
        floating = jax.dtypes.issubdtype(rows.dtype, np.floating)
    except TypeError:  # (a dtype JAX does not know: none of its floating-point ones)
        floating = False
    if not floating:
        raise AdapterError(
            f"{where} has dtype {rows.dtype}; expected a floating-point array (float32, "
            "bfloat16, float16 or float64)"
        )


def pack_weights(
    weights: LoraWeights, config: ModelConfig, rows_per_page: int, dtype
) -> PackedAdapter:
    """Cuts an adapter's rank-rows into pages in the pool dtype (rows past the rank are 0).
    AdapterError for a value past the largest of a pool dtype narrower than float32's range
    (float16: it would be inf there)."""
    import ml_dtypes

    footprint = AdapterFootprint.of_weights(weights)
    largest = float(ml_dtypes.finfo(dtype).max)
    widths = layout.pool_widths(
        config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    )
    need = footprint.pages_needed(rows_per_page)
    blocks = {
        axis: np.zeros((config.num_layers, page_bucket(n), rows_per_page, widths[axis]), dtype)
        for axis, n in need.items()
        if n
    }
    cursor = dict.fromkeys(POOL_AXES, 0)
    for m, r in zip(MODULES, footprint.ranks, strict=True):
        if not r:
            continue
        n = layout.pages_for_rank(r, rows_per_page)
        sides = zip("ab", MODULE_POOLS[m], (weights.a[m], weights.b[m]), strict=True)
        for factor, axis, rows in sides:
            # Rows of a wider range than the pool's (float64 into float32, float32 into
            # float16) would turn inf in the cast.
            wider = float(ml_dtypes.finfo(rows.dtype).max) > largest
            peak = float(np.max(np.abs(rows))) if wider else 0.0
            if peak > largest:
                advice = (
                    "serve it in bfloat16 or float32"
                    if largest < float(np.finfo(np.float32).max)
                    else "scale the adapter's weights into float32's range"
                )
                raise AdapterError(
                    f"adapter {weights.name!r} ({weights.source or 'in memory'}): tensor "
                    f"{factor}[{m!r}] holds {peak:.4g}, past the largest {np.dtype(dtype).name} "
                    f"value of the adapter pools ({largest:.6g}); {advice}"
                )
            padded = np.zeros((config.num_layers, n * rows_per_page, widths[axis]), dtype)
            padded[:, :r] = rows
            blocks[axis][:, cursor[axis] : cursor[axis] + n] = padded.reshape(
                config.num_layers, n, rows_per_page, widths[axis]
            )
            cursor[axis] += n
    return PackedAdapter(footprint=footprint, blocks=blocks)


def unpack_weights(
    packed: PackedAdapter, config: ModelConfig, rows_per_page: int, name: str
) -> LoraWeights:
    """The rank-rows of a packed adapter (``pack_weights``' inverse, in the packed dtype)."""
    shapes = config.module_shapes()
    blocks = {axis: np.asarray(block) for axis, block in packed.blocks.items()}
    cursor = dict.fromkeys(POOL_AXES, 0)
    a, b, scales = {}, {}, {}
    for m, r, scale in zip(MODULES, packed.footprint.ranks, packed.footprint.scales, strict=True):
        if not r:
            continue
        n = layout.pages_for_rank(r, rows_per_page)
        rows = []
        for axis, width in zip(MODULE_POOLS[m], shapes[m], strict=True):
            block = blocks[axis][:, cursor[axis] : cursor[axis] + n]
            rows.append(block.reshape(config.num_layers, n * rows_per_page, -1)[:, :r, :width])
            cursor[axis] += n
        a[m], b[m], scales[m] = rows[0], rows[1], scale
    return LoraWeights(name=name, a=a, b=b, scales=scales)

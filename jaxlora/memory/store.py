"""Host store: every registered adapter, its weights kept in host RAM in the pool's page layout.

Registration reads only headers (``jaxlora.formats.read_peft_adapter_spec``), so thousands of
adapters register in seconds and a bad one is refused before anything is served from it. Weights
are read on first use (or at registration with ``eager=True``), packed into pages in the pool
dtype and cached; when the cache exceeds ``host_budget_bytes`` the least recently used adapters
drop back to disk-only (they are re-read on their next use). Adapters registered from memory
(``register_weights``) have no file to fall back on and are never dropped.

Every registration gets a fresh ``version``; the manager keys GPU residency by (name, version),
so replacing an adapter never touches the pages that in-flight requests of the old one read.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.errors import AdapterError, FormatError, JaxloraError, UnknownAdapterError
from jaxlora.lora import LoraWeights, merge_lora_parameters, merge_lora_weights
from jaxlora.memory.packing import (
    AdapterFootprint,
    PackedAdapter,
    pack_weights,
    packed_nbytes,
    unpack_weights,
    validate_weights,
)

MEMORY_SOURCE = "<memory>"
MAX_NAME_LENGTH = 256


def check_lookup_name(name) -> None:
    """AdapterError for a name that cannot be an adapter's (a list was a TypeError from the
    registry's dict; an int, "not registered" where the mistake is the argument's type)."""
    if not isinstance(name, str):
        raise AdapterError(f"adapter name {name!r:.100}: expected a string")


@dataclasses.dataclass(frozen=True)
class AdapterStoreConfig:
    """Host-side options of the adapter store.

    dtype: element type of the host copy and of the GPU pool (weights are cast once, at load);
    host_budget_bytes: the most bytes of disk-backed adapters kept in RAM (None: no limit);
    eager: read and pack weights at registration instead of on first use (a registration whose
    weights cannot be read or packed then fails and registers nothing);
    host_memory_kind: None keeps numpy arrays (pageable memory); "pinned_host" keeps jax arrays
    in page-locked host memory, which the GPU reads several times faster (H100, one 84 MB
    adapter: ready 3.0 ms after acquire against 8.6 ms from numpy), at the price of pinned RAM
    and of a copy into it when an adapter is loaded; "auto": pinned_host when the default device
    is a GPU, else None.
    """

    dtype: str = "float32"
    host_budget_bytes: int | None = None
    eager: bool = False
    host_memory_kind: str | None = "auto"

    def __post_init__(self):
        try:
            np.dtype(self.dtype_object())
        except TypeError as e:
            raise AdapterError(
                f"adapter store config field 'dtype': {self.dtype!r} is not a "
                "numpy/JAX dtype name (expected e.g. 'float32', 'bfloat16')"
            ) from e
        if self.host_budget_bytes is not None and (
            not isinstance(self.host_budget_bytes, int) or self.host_budget_bytes < 0
        ):
            raise AdapterError(
                "adapter store config field 'host_budget_bytes': expected None "
                f"or an int >= 0, got {self.host_budget_bytes!r}"
            )
        if self.host_memory_kind not in (None, "pinned_host", "auto"):
            raise AdapterError(
                "adapter store config field 'host_memory_kind': expected None, "
                f"'pinned_host' or 'auto', got {self.host_memory_kind!r}"
            )

    def resolved_host_memory_kind(self) -> str | None:
        if self.host_memory_kind != "auto":
            return self.host_memory_kind
        import jax

        return "pinned_host" if jax.devices()[0].platform == "gpu" else None

    def dtype_object(self):
        # bfloat16 and friends are not numpy builtins; jax.numpy knows them (via ml_dtypes).
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One registered version of an adapter (an immutable snapshot)."""

    name: str
    version: int
    source: str  # the PEFT directory, or MEMORY_SOURCE
    footprint: AdapterFootprint
    nbytes: int  # bytes of the packed host copy (= bytes copied to the GPU pool)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


@dataclasses.dataclass(frozen=True)
class RegistrationReport:
    """Outcome of register_root: names registered, and the error of each directory refused."""

    registered: tuple[str, ...]
    failed: dict[str, JaxloraError]


@dataclasses.dataclass(frozen=True)
class StoreStats:
    registered: int
    cached: int  # adapters whose packed weights are in RAM
    host_bytes: int  # RAM held by packed weights (disk-backed + memory-only)
    host_budget_bytes: int | None
    loads: int  # reads from disk
    drops: int  # adapters dropped back to disk-only under the budget
    load_seconds: dict[str, float]  # last disk read + pack time of each adapter


class AdapterStore:
    """Registry of adapters and their host-RAM weights; thread-safe."""

    def __init__(
        self,
        model_config: ModelConfig,
        pool_config: LoraPoolConfig,
        config: AdapterStoreConfig | None = None,
    ):
        self.model_config = model_config
        self.pool_config = pool_config
        self.config = config or AdapterStoreConfig()
        self.dtype = self.config.dtype_object()
        self.host_memory_kind = self.config.resolved_host_memory_kind()
        self._entries: dict[str, AdapterEntry] = {}
        # Packed weights of disk-backed versions, least recently used first.
        self._cache: collections.OrderedDict[tuple[str, int], PackedAdapter] = (
            collections.OrderedDict()
        )
        self._cached_bytes = 0
        # Memory-only versions: their only copy, never dropped.
        self._memory_only: dict[tuple[str, int], PackedAdapter] = {}
        self._next_version = 1
        self._loads = 0
        self._drops = 0
        self._load_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- registration

    def register(self, name: str, path: str | os.PathLike) -> AdapterEntry:
        """Registers the PEFT directory at path as `name` (header-only validation)."""
        self._check_name(name)
        entry = self._entry_from_path(name, path)
        return self._insert(entry, replace=False)

    def register_weights(self, name: str, weights: LoraWeights) -> AdapterEntry:
        """Registers an in-memory adapter (already in the rank-row layout) as `name`."""
        self._check_name(name)
        entry, packed = self._entry_from_weights(name, weights)
        return self._insert(entry, replace=False, packed=packed)

    def register_root(
        self, root: str | os.PathLike, *, skip_invalid: bool = False
    ) -> RegistrationReport:
        """Registers every PEFT directory directly under root, named after its directory.

        With skip_invalid=False one bad directory (or a name already taken) registers nothing
        and raises AdapterError listing every failure; with True the valid ones are registered
        and the failures are returned in the report.
        """
        root = os.fspath(root)
        try:
            children = sorted(
                e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
            )
        except OSError as e:
            raise FormatError(f"{root}: cannot list adapter root directory ({e.strerror})") from e
        entries, failed, reads = [], {}, {}
        for child in children:
            try:
                self._check_name(child)
                entry = self._entry_from_path(child, os.path.join(root, child))
                if self.config.eager:
                    reads[child] = self._timed_read(entry)
                entries.append(entry)
            except JaxloraError as e:
                failed[child] = e
        with self._lock:
            for entry in entries:
                if entry.name in self._entries:
                    failed[entry.name] = AdapterError(
                        f"adapter name {entry.name!r} ({entry.source}) is already registered "
                        f"(from {self._entries[entry.name].source})"
                    )
            if failed and not skip_invalid:
                lines = "; ".join(f"{n}: {e}" for n, e in sorted(failed.items()))
                raise AdapterError(
                    f"{root}: {len(failed)} of {len(children)} adapter "
                    f"directories refused, none registered: {lines}"
                )
            registered = []
            for entry in entries:
                if entry.name not in failed:
                    self._entries[entry.name] = entry
                    registered.append(entry.name)
                    if entry.name in reads:
                        self._keep_read_locked(entry, *reads[entry.name])
        return RegistrationReport(registered=tuple(registered), failed=failed)

    def replace(self, name: str, path_or_weights: str | os.PathLike | LoraWeights) -> AdapterEntry:
        """Registers a new version of an existing adapter. The old version stays valid for
        whoever holds its entry (in-flight requests); new lookups get the new one."""
        if isinstance(path_or_weights, LoraWeights):
            entry, packed = self._entry_from_weights(name, path_or_weights)
        else:
            entry, packed = self._entry_from_path(name, path_or_weights), None
        return self._insert(entry, replace=True, packed=packed)

    def unregister(self, name: str) -> AdapterEntry:
        """Forgets `name`; returns the entry it had. Holders of the entry may still load it."""
        check_lookup_name(name)
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise UnknownAdapterError(self._unknown_message(name))
            self._forget_weights(entry.key)
        return entry

    def merged_weights(self, name: str, parts: Sequence[tuple[str, float]]) -> LoraWeights:
        """The weighted sum of registered adapters' updates as one adapter named ``name``
        (``jaxlora.lora.merge_lora_weights``, from their current versions' packed rows; register
        it with ``register_weights`` or ``replace``). UnknownAdapterError for a part that is
        not registered; AdapterError where the sum of ranks passes the pool's max_rank."""
        return merge_lora_weights(
            self._current_rows(name, parts), name, max_rank=self.pool_config.max_rank
        )

    def parameter_merged_weights(
        self, name: str, parts: Sequence[tuple[str, float]], **merge
    ) -> LoraWeights:
        """LoRAX's merge of registered adapters' A and B (``jaxlora.lora.merge_lora_parameters``
        with ``merge``'s strategy, density, majority_sign_method and seed), from their current
        versions' packed rows. UnknownAdapterError for a part that is not registered;
        AdapterError for a part of another rank, or bad merge fields."""
        return merge_lora_parameters(self._current_rows(name, parts), name, **merge)

    def _current_rows(
        self, name: str, parts: Sequence[tuple[str, float]]
    ) -> list[tuple[LoraWeights, float]]:
        """Each (registered adapter, weight) as its current version's rank-rows, with it."""
        if not isinstance(parts, Sequence) or not all(
            isinstance(part, (tuple, list)) and len(part) == 2 and isinstance(part[0], str)
            for part in parts
        ):
            raise AdapterError(
                f"merge {name!r}: parts: expected (adapter name, weight) pairs, got {parts!r:.200}"
            )
        rows_per_page = self.pool_config.rows_per_page
        return [
            (unpack_weights(self.load(self.get(part)), self.model_config, rows_per_page, part), w)
            for part, w in parts
        ]

    # ----------------------------------------------------------------- lookups

    def get(self, name: str) -> AdapterEntry:
        check_lookup_name(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownAdapterError(self._unknown_message(name))
            return entry

    def current(self, name: str) -> AdapterEntry | None:
        """The registered entry of name, or None (no exception: for hot paths)."""
        return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def is_cached(self, entry: AdapterEntry) -> bool:
        return entry.key in self._cache or entry.key in self._memory_only

    def cached_weights(self, entry: AdapterEntry) -> PackedAdapter | None:
        """The packed weights of entry if they are in RAM (marks them recently used)."""
        with self._lock:
            return self._cached_locked(entry.key)

    def load(self, entry: AdapterEntry) -> PackedAdapter:
        """The packed weights of entry, read from disk when not in RAM.

        Reading happens outside the store's lock, so loads of different adapters overlap and
        registrations are not held up. Raises FormatError when the file is missing, truncated or
        no longer matches what was registered.
        """
        with self._lock:
            packed = self._cached_locked(entry.key)
        if packed is not None:
            return packed
        packed, seconds = self._timed_read(entry)
        with self._lock:
            self._keep_read_locked(entry, packed, seconds)
        return packed

    def stats(self) -> StoreStats:
        with self._lock:
            memory_bytes = sum(p.nbytes for p in self._memory_only.values())
            return StoreStats(
                registered=len(self._entries),
                cached=len(self._cache) + len(self._memory_only),
                host_bytes=self._cached_bytes + memory_bytes,
                host_budget_bytes=self.config.host_budget_bytes,
                loads=self._loads,
                drops=self._drops,
                load_seconds=dict(self._load_seconds),
            )

    # ----------------------------------------------------------------- internals

    def _check_name(self, name) -> None:
        if (
            not isinstance(name, str)
            or not name
            or name != name.strip()
            or len(name) > MAX_NAME_LENGTH
            or not name.isprintable()
        ):
            raise AdapterError(
                f"adapter name {name!r}: expected a non-empty printable string of "
                f"at most {MAX_NAME_LENGTH} characters without surrounding "
                "whitespace"
            )

    def _unknown_message(self, name: str) -> str:
        return (
            f"adapter {name!r} is not registered ({len(self._entries)} adapters are; "
            "register it first)"
        )

    def _new_version(self) -> int:
        with self._lock:
            version = self._next_version
            self._next_version += 1
            return version

    def _check_fits(self, name: str, source: str, footprint: AdapterFootprint) -> None:
        """AdapterError where the adapter takes more pages of a pool than the pool has: it could
        never be resident, and its requests would wait for ever."""
        need = footprint.pages_needed(self.pool_config.rows_per_page)
        over = {a: n for a, n in need.items() if n > self.pool_config.pages_in(a)}
        if over:
            detail = ", ".join(
                f"{n} of pool {a!r}, which has {self.pool_config.pages_in(a)}"
                for a, n in over.items()
            )
            raise AdapterError(
                f"adapter {name!r} ({source}): its rank-rows take {detail}, so it can never be "
                "resident; raise --adapter_pool_pages / --adapter_pool_axis_pages "
                "(LoraPoolConfig.pages_per_pool / axis_pages)"
            )

    def _entry_from_path(self, name: str, path) -> AdapterEntry:
        from jaxlora.formats import read_peft_adapter_spec

        if not isinstance(path, (str, os.PathLike)):
            # (os.fspath's TypeError named no adapter and no argument)
            raise AdapterError(
                f"adapter {name!r}: source: expected a PEFT adapter directory (a path) or "
                f"LoraWeights, got {type(path).__name__}"
            )
        path = os.fspath(path)
        spec = read_peft_adapter_spec(path, self.model_config, max_rank=self.pool_config.max_rank)
        footprint = AdapterFootprint.from_modules(dict(spec.ranks), dict(spec.scales))
        self._check_fits(name, path, footprint)
        return AdapterEntry(
            name=name,
            version=self._new_version(),
            source=path,
            footprint=footprint,
            nbytes=packed_nbytes(
                footprint, self.model_config, self.pool_config.rows_per_page, self.dtype
            ),
        )

    def _entry_from_weights(
        self, name: str, weights: LoraWeights
    ) -> tuple[AdapterEntry, PackedAdapter]:
        validate_weights(
            weights,
            self.model_config,
            max_rank=self.pool_config.max_rank,
            source=weights.source or MEMORY_SOURCE,
        )
        self._check_fits(
            name, weights.source or MEMORY_SOURCE, AdapterFootprint.of_weights(weights)
        )
        packed = self._to_host_memory(
            pack_weights(weights, self.model_config, self.pool_config.rows_per_page, self.dtype)
        )
        entry = AdapterEntry(
            name=name,
            version=self._new_version(),
            source=MEMORY_SOURCE,
            footprint=packed.footprint,
            nbytes=packed.nbytes,
        )
        return entry, packed

    def _insert(
        self, entry: AdapterEntry, *, replace: bool, packed: PackedAdapter | None = None
    ) -> AdapterEntry:
        read = None
        if self.config.eager and packed is None:
            # Read before the entry becomes visible: a file that cannot be read or packed
            # refuses the registration (or the replace) and changes nothing.
            with self._lock:
                self._check_insertable_locked(entry, replace=replace)
            read = self._timed_read(entry)
        with self._lock:
            old = self._check_insertable_locked(entry, replace=replace)
            if old is not None:
                self._forget_weights(old.key)
            self._entries[entry.name] = entry
            if packed is not None:
                self._memory_only[entry.key] = packed
            if read is not None:
                self._keep_read_locked(entry, *read)
        return entry

    def _check_insertable_locked(
        self, entry: AdapterEntry, *, replace: bool
    ) -> AdapterEntry | None:
        """The entry name has now (None: unregistered); raises unless entry may take its place."""
        old = self._entries.get(entry.name)
        if replace and old is None:
            raise UnknownAdapterError(self._unknown_message(entry.name))
        if not replace and old is not None:
            raise AdapterError(
                f"adapter name {entry.name!r} ({entry.source}) is already "
                f"registered (from {old.source}); unregister or replace it"
            )
        return old

    def _timed_read(self, entry: AdapterEntry) -> tuple[PackedAdapter, float]:
        start = time.perf_counter()
        packed = self._read_and_pack(entry)
        return packed, time.perf_counter() - start

    def _keep_read_locked(self, entry: AdapterEntry, packed: PackedAdapter, seconds: float) -> None:
        """Counts a read from disk and caches its weights while entry is current."""
        self._loads += 1
        self._load_seconds[entry.name] = seconds
        if self._entries.get(entry.name) is entry:
            self._cache_locked(entry.key, packed)

    def _read_and_pack(self, entry: AdapterEntry) -> PackedAdapter:
        from jaxlora.formats import load_peft_adapter

        if entry.source == MEMORY_SOURCE:
            # A memory-only version whose only copy was dropped by unregister/replace.
            raise UnknownAdapterError(
                f"adapter {entry.name!r} version {entry.version} was "
                "registered from memory and has been unregistered"
            )
        weights = load_peft_adapter(
            entry.source, self.model_config, max_rank=self.pool_config.max_rank, name=entry.name
        )
        packed = pack_weights(
            weights, self.model_config, self.pool_config.rows_per_page, self.dtype
        )
        if packed.footprint != entry.footprint:
            raise FormatError(
                f"{entry.source}: adapter {entry.name!r} changed on disk since it "
                f"was registered (ranks/scales {packed.footprint} now, "
                f"{entry.footprint} then); replace it to serve the new files"
            )
        return self._to_host_memory(packed)

    def _to_host_memory(self, packed: PackedAdapter) -> PackedAdapter:
        kind = self.host_memory_kind
        if kind is None:
            return packed
        import jax

        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
        blocks = jax.device_put(packed.blocks, sharding)
        return PackedAdapter(footprint=packed.footprint, blocks=jax.block_until_ready(blocks))

    def _cached_locked(self, key) -> PackedAdapter | None:
        packed = self._memory_only.get(key)
        if packed is not None:
            return packed
        packed = self._cache.get(key)
        if packed is not None:
            self._cache.move_to_end(key)
        return packed

    def _cache_locked(self, key, packed: PackedAdapter) -> None:
        if key in self._cache:
            return
        budget = self.config.host_budget_bytes
        if budget is not None and packed.nbytes > budget:
            return  # larger than the whole budget: served from disk on every load
        self._cache[key] = packed
        self._cached_bytes += packed.nbytes
        while budget is not None and self._cached_bytes > budget:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes
            self._drops += 1

    def _forget_weights(self, key) -> None:
        packed = self._cache.pop(key, None)
        if packed is not None:
            self._cached_bytes -= packed.nbytes
        self._memory_only.pop(key, None)

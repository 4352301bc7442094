"""Adapter manager: makes adapters resident in the GPU page pool on demand (S-LoRA's paging).

Life of a cold adapter (a *miss*)::

    acquire(name) ─► pages allocated at once (LRU eviction of unreferenced, unpinned adapters),
                     slot (page table, ranks, scales) known at once, handle returned
      LOADING  ─► weights read from disk into host RAM on a loader thread (skipped when cached)
      QUEUED   ─► poll(): the host-to-device transfers of every queued adapter are issued in
                  one asynchronous jax.device_put call, straight from the store's page blocks
      STAGED   ─► poll() once an adapter's transfer landed: a jitted scatter of its pages into
                  the pool arrays, which are donated (updated in place, no copy of the pool)
      COPYING  ─► the scatter finished: READY, ``handle.ready`` is true

Transfers are not gathered into one host staging buffer: on the H100 that host-side gathering
(a memcpy into fresh pages) made a cold 80 MB adapter take 33 ms to become ready, against 8 ms
when sent straight from the store's numpy blocks and 2.8 ms from pinned_host blocks; and a
single scatter over a mixed batch would compile once per batch composition. Each adapter's
scatter is one small jitted call whose shapes are bucketed page counts, so few shapes ever
compile.

The scatter is issued only after its transfer landed, so a decode step dispatched meanwhile never
waits for a cold adapter's bytes: the request that needs it waits (``handle.ready`` false) while
the others run. Scatters are issued in allocation order, so pages taken from an evicted adapter
are always written by their new owner last.

Threading: every method is thread-safe. poll(), wait() and pin() replace the pool arrays
(donation deletes the previous ones); a thread that dispatches computations on ``pools`` while
other threads may poll must do so inside ``with manager.locked_pools() as pools:`` (dispatch is
asynchronous, so the lock is held only for the dispatch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import AdapterError, JaxloraError, PoolExhaustedError
from jaxlora.lora import LoraWeights
from jaxlora.memory.allocator import PageAllocator, PoolUsage
from jaxlora.memory.packing import PackedAdapter
from jaxlora.memory.store import (
    AdapterEntry,
    AdapterStore,
    RegistrationReport,
    check_lookup_name,
)
from pallas_kernels import layout
from pallas_kernels.layout import POOL_AXES, SlotInfo


@dataclasses.dataclass(frozen=True)
class AdapterManagerConfig:
    """load_workers: threads reading cold adapters from disk (0: read inside acquire(), which
    then blocks; deterministic, for tests and tools); max_copy_bytes_in_flight: the most adapter
    bytes transferred but not yet scattered into the pool (the device memory copies borrow;
    one adapter larger than this still goes alone)."""

    load_workers: int = 2
    max_copy_bytes_in_flight: int = 1 << 30

    def __post_init__(self):
        if not isinstance(self.load_workers, int) or self.load_workers < 0:
            raise AdapterError(
                "adapter manager config field 'load_workers': expected an int "
                f">= 0, got {self.load_workers!r}"
            )
        if not isinstance(self.max_copy_bytes_in_flight, int) or self.max_copy_bytes_in_flight <= 0:
            raise AdapterError(
                "adapter manager config field 'max_copy_bytes_in_flight': "
                f"expected a positive int, got {self.max_copy_bytes_in_flight!r}"
            )


class _State(enum.Enum):
    LOADING = "loading"
    QUEUED = "queued"
    STAGED = "staged"
    COPYING = "copying"
    READY = "ready"
    FAILED = "failed"


class _Residency:
    """One adapter version holding pages of the pool (or, once FAILED/dead, no longer)."""

    def __init__(self, entry: AdapterEntry, pages: dict[str, list[int]], slot: SlotInfo):
        self.entry = entry
        self.pages = pages
        self.slot = slot
        self.refs = 0
        self.state = _State.LOADING
        self.packed: PackedAdapter | None = None
        self.stage: dict[str, jax.Array] | None = None  # the transferred page blocks
        self.marker: jax.Array | None = None  # ready when the scatter into the pool finished
        self.load_future: concurrent.futures.Future | None = None
        self.error: JaxloraError | None = None
        self.dead = False  # pages returned to the allocators
        self.started = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class ResidentInfo:
    """A snapshot of one adapter version holding pool pages."""

    name: str
    version: int
    refs: int
    pinned: bool
    state: str  # loading | queued | staged | copying | ready
    pages: dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class ManagerStats:
    hits: int
    misses: int
    evictions: int
    load_failures: int
    bytes_copied: int  # bytes sent host -> device (packed blocks, bucket padding included)
    transfer_batches: int  # poll()s that issued transfers (one device_put call each)
    scatters: int  # jitted scatters into the pools (one per adapter copied)
    resident: int
    referenced: int
    pinned: int
    # Seconds from the miss in acquire() until the copy was seen landed (poll/ready/wait), of
    # the last load of each adapter.
    load_seconds: dict[str, float]
    pools: dict[str, PoolUsage]


class AdapterHandle:
    """A reference to one resident adapter version, returned by AdapterManager.acquire.

    ``slot_info`` (page ids, ranks, scales) is valid at once; the rows in those pages are valid
    once ``ready`` is true. ``error`` is set (and ``wait`` raises it) when loading failed.
    Release exactly once, with ``release()`` or ``manager.release(handle)``.
    """

    def __init__(self, manager: AdapterManager, residency: _Residency):
        self._manager = manager
        self._residency = residency
        self.name = residency.entry.name
        self.version = residency.entry.version
        self.slot_info: SlotInfo = residency.slot
        self.released = False

    @property
    def ready(self) -> bool:
        return self._manager._is_ready(self._residency)

    @property
    def error(self) -> JaxloraError | None:
        return self._residency.error

    def wait(self, timeout: float | None = None) -> AdapterHandle:
        self._manager.wait(self, timeout=timeout)
        return self

    def release(self) -> None:
        self._manager.release(self)

    def __repr__(self):
        return (
            f"AdapterHandle({self.name!r}, version={self.version}, "
            f"state={self._residency.state.value})"
        )


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_pages(pools, stage, page_ids):
    # Ids equal to the pool size are padding (or pages since evicted) and are dropped.
    updated = {
        axis: pools[axis]
        .at[:, page_ids[axis]]
        .set(stage[axis].astype(pools[axis].dtype), mode="drop")
        for axis in pools
    }
    # A small output that becomes ready with the scatter and is never donated afterwards.
    marker = sum(jnp.sum(ids) for ids in page_ids.values())
    return updated, marker


class AdapterManager:
    """Pages adapters of an AdapterStore into the GPU pool; see the module docstring."""

    def __init__(
        self,
        store: AdapterStore,
        config: AdapterManagerConfig | None = None,
        *,
        shardings: dict[str, jax.sharding.Sharding] | None = None,
    ):
        """shardings: the sharding of each pool array (e.g. jaxlora.sharding.pool_shardings(mesh)
        for tensor parallelism); default: the first device."""
        self.store = store
        self.config = config or AdapterManagerConfig()
        model, pool = store.model_config, store.pool_config
        self.pool_config = pool
        self._rows_per_page = pool.rows_per_page
        self._dtype = store.dtype
        widths = layout.pool_widths(
            model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
        )
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self._shardings = {axis: (shardings or {}).get(axis, default) for axis in POOL_AXES}
        self._pools = {
            axis: jnp.zeros(
                (model.num_layers, pool.pages_in(axis), pool.rows_per_page, widths[axis]),
                self._dtype,
                device=self._shardings[axis],
            )
            for axis in POOL_AXES
        }
        self.allocators = {
            axis: PageAllocator(pool.pages_in(axis), name=f"adapter/{axis}") for axis in POOL_AXES
        }
        self._lock = threading.RLock()
        # Every version holding pages, least recently used first (eviction order).
        self._residents: collections.OrderedDict[tuple[str, int], _Residency] = (
            collections.OrderedDict()
        )
        self._pinned: set[str] = set()
        self._queued: collections.deque[_Residency] = collections.deque()
        self._staged: collections.deque[_Residency] = collections.deque()
        self._copying: collections.deque[_Residency] = collections.deque()
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(
                self.config.load_workers, thread_name_prefix="jaxlora-adapter-load"
            )
            if self.config.load_workers
            else None
        )
        self._hits = self._misses = self._evictions = self._load_failures = 0
        self._bytes_copied = self._transfer_batches = self._scatters = 0
        self._load_seconds: dict[str, float] = {}
        self._closed = False

    # ----------------------------------------------------------------- registry (any thread)

    def register(self, name: str, source: str | os.PathLike | LoraWeights) -> AdapterEntry:
        """Registers a PEFT directory (or in-memory weights) under name; see AdapterStore."""
        if isinstance(source, LoraWeights):
            return self.store.register_weights(name, source)
        return self.store.register(name, source)

    def register_root(
        self, root: str | os.PathLike, *, skip_invalid: bool = False
    ) -> RegistrationReport:
        return self.store.register_root(root, skip_invalid=skip_invalid)

    def replace(self, name: str, source: str | os.PathLike | LoraWeights) -> AdapterEntry:
        """Registers a new version under name. Handles of the old version keep reading the old
        rows until released; acquire() returns the new version from now on. A pinned name stays
        pinned (the new version is made resident now when the pool has room, else on first
        use)."""
        entry = self.store.replace(name, source)
        with self._lock:
            self._retire_stale(name)
            pinned = name in self._pinned
        if pinned:
            try:
                self.release(self.acquire(name))
            except JaxloraError:
                pass  # no room now (or a load error): tried again, and reported, on first use
        return entry

    def unregister(self, name: str) -> AdapterEntry:
        """Forgets name; pages of versions nobody references are freed now, the others when
        their last handle is released."""
        entry = self.store.unregister(name)
        with self._lock:
            self._pinned.discard(name)
            self._load_seconds.pop(name, None)
            self._retire_stale(name)
        return entry

    # ----------------------------------------------------------------- residency

    def acquire(self, name: str) -> AdapterHandle:
        """Makes the current version of name resident (or starts to) and returns a handle that
        holds a reference to it. Raises UnknownAdapterError for an unregistered name,
        PoolExhaustedError when pages held by referenced or pinned adapters leave no room (retry
        after releases), and, with load_workers=0, the FormatError of a bad file."""
        if self._closed:
            raise AdapterError(f"adapter {name!r}: the adapter manager is closed")
        for _ in range(3):
            entry = self.store.get(name)
            with self._lock:
                handle = self._acquire_resident(entry)
                if handle is not None:
                    return handle
                packed = self.store.cached_weights(entry)
                if packed is not None or self._executor is not None:
                    return self._admit(entry, packed)
            try:
                packed = self.store.load(entry)
            except JaxloraError:
                if self.store.current(name) is entry:
                    raise
                continue  # replaced or unregistered while reading: look the name up again
            with self._lock:
                handle = self._acquire_resident(entry)
                if handle is not None:
                    return handle
                return self._admit(entry, packed)
        raise AdapterError(f"adapter {name!r} kept changing while it was being loaded; retry")

    def release(self, handle: AdapterHandle) -> None:
        """Drops the handle's reference (exactly once per acquire)."""
        with self._lock:
            if handle.released:
                raise AdapterError(
                    f"adapter {handle.name!r} version {handle.version}: handle released twice"
                )
            handle.released = True
            rec = handle._residency
            rec.refs -= 1
            if rec.refs or rec.dead:
                return
            if self.store.current(rec.entry.name) is not rec.entry:
                self._free(rec)  # an old version nobody can acquire any more
            else:
                self._residents.move_to_end(rec.entry.key)

    def pin(self, name: str, *, wait: bool = False) -> None:
        """Keeps the current version of name resident until unpin (it is never evicted). Raises
        like acquire() when it cannot be made resident (with wait, its load error too), and then
        leaves name unpinned."""
        check_lookup_name(name)  # (before it goes into the set of pinned names)
        with self._lock:
            was_pinned = name in self._pinned
            self._pinned.add(name)
        try:
            handle = self.acquire(name)
            try:
                if wait:
                    handle.wait()
            finally:
                self.release(handle)
        except BaseException:
            # (a background load's error reaches us only in wait(): the same failure as
            # acquire()'s with load_workers=0, so the same outcome)
            if not was_pinned:
                with self._lock:
                    self._pinned.discard(name)
            raise

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def unpin(self, name: str) -> bool:
        """Makes name evictable again; returns whether it was pinned."""
        with self._lock:
            was_pinned = name in self._pinned
            self._pinned.discard(name)
            return was_pinned

    def evict(self, name: str) -> bool:
        """Frees the pages of the current version of name if nothing references or pins it;
        returns whether it did."""
        with self._lock:
            entry = self.store.current(name)
            rec = self._residents.get(entry.key) if entry is not None else None
            if rec is None or not self._evictable(rec):
                return False
            self._free(rec)
            self._evictions += 1
            return True

    def evict_all_unused(self) -> int:
        """Frees every resident adapter that nothing references or pins; returns how many."""
        with self._lock:
            victims = [rec for rec in self._residents.values() if self._evictable(rec)]
            for rec in victims:
                self._free(rec)
            self._evictions += len(victims)
            return len(victims)

    def slot_info(self, handle: AdapterHandle) -> SlotInfo:
        return handle.slot_info

    # ----------------------------------------------------------------- copies and readiness

    @property
    def pools(self) -> dict[str, jax.Array]:
        """The current pool arrays ({axis: (num_layers, pages, rows_per_page, width)}); valid until
        the next poll()/wait()/pin() of any thread (see locked_pools)."""
        with self._lock:
            return dict(self._pools)

    @contextlib.contextmanager
    def locked_pools(self):
        """Holds the manager's lock while the caller dispatches work on the pools it yields."""
        with self._lock:
            yield dict(self._pools)

    def poll(self) -> None:
        """Advances copies without blocking: issues the transfers of queued adapters (one
        batched call) and the scatters of transfers that landed, and notes which copies
        finished. Call it once per engine step."""
        with self._lock:
            self._issue_transfers()
            self._issue_scatters()
            self._note_finished()

    def wait(self, handle: AdapterHandle, timeout: float | None = None) -> None:
        """Blocks until the handle's adapter is ready; raises its load error, or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        rec = handle._residency
        while True:
            with self._lock:
                self._issue_transfers()
                self._issue_scatters()
                self._note_finished()
                state, future, own_marker = rec.state, rec.load_future, rec.marker
                # Copies complete in order: else wait for the oldest one still in flight.
                stage = self._staged[0].stage if self._staged else None
                marker = self._copying[0].marker if self._copying else None
            if state is _State.READY:
                return
            if state is _State.FAILED:
                raise rec.error
            if rec.dead:
                raise AdapterError(
                    f"adapter {handle.name!r} version {handle.version} is no "
                    "longer resident (its handle was released)"
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"adapter {handle.name!r}: not resident after {timeout} s (state {state.value})"
                )
            if state is _State.LOADING and future is not None:
                if future.cancelled():
                    raise AdapterError(
                        f"adapter {handle.name!r}: the adapter manager was closed "
                        "before it was loaded"
                    )
                concurrent.futures.wait([future], timeout=remaining)
            elif state is _State.COPYING and own_marker is not None:
                own_marker.block_until_ready()
            elif stage is not None:
                jax.block_until_ready(stage)
            elif marker is not None:
                marker.block_until_ready()

    def wait_all(self, timeout: float | None = None) -> None:
        """Blocks until every resident adapter is ready (load errors are left on the handles)."""
        with self._lock:
            pending = [rec for rec in self._residents.values() if rec.state is not _State.READY]
        for rec in pending:
            handle = AdapterHandle(self, rec)
            handle.released = True  # a view for waiting only; it holds no reference
            with contextlib.suppress(JaxloraError):
                self.wait(handle, timeout=timeout)

    # ----------------------------------------------------------------- figures

    def stats(self) -> ManagerStats:
        with self._lock:
            return ManagerStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                load_failures=self._load_failures,
                bytes_copied=self._bytes_copied,
                transfer_batches=self._transfer_batches,
                scatters=self._scatters,
                resident=len(self._residents),
                referenced=sum(1 for r in self._residents.values() if r.refs),
                pinned=len(self._pinned),
                load_seconds=dict(self._load_seconds),
                pools={axis: a.usage() for axis, a in self.allocators.items()},
            )

    def residents(self) -> list[ResidentInfo]:
        with self._lock:
            return [
                ResidentInfo(
                    name=rec.entry.name,
                    version=rec.entry.version,
                    refs=rec.refs,
                    pinned=self._is_pinned(rec),
                    state=rec.state.value,
                    pages={a: tuple(p) for a, p in rec.pages.items()},
                )
                for rec in self._residents.values()
            ]

    def pinned_names(self) -> set[str]:
        with self._lock:
            return set(self._pinned)

    def close(self) -> None:
        """Stops the loader threads (pending loads are abandoned)."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- internals (under lock)

    def _acquire_resident(self, entry: AdapterEntry) -> AdapterHandle | None:
        rec = self._residents.get(entry.key)
        if rec is None:
            return None
        self._hits += 1
        rec.refs += 1
        self._residents.move_to_end(entry.key)
        return AdapterHandle(self, rec)

    def _admit(self, entry: AdapterEntry, packed: PackedAdapter | None) -> AdapterHandle:
        pages = self._allocate(entry)
        rec = _Residency(entry, pages, entry.footprint.slot_info(pages, self._rows_per_page))
        rec.refs = 1
        self._residents[entry.key] = rec
        self._misses += 1
        if packed is not None:
            self._queue(rec, packed)
        else:
            rec.load_future = self._executor.submit(self._load_in_background, rec)
        return AdapterHandle(self, rec)

    def _queue(self, rec: _Residency, packed: PackedAdapter) -> None:
        rec.packed = packed
        rec.state = _State.QUEUED
        self._queued.append(rec)

    def _load_in_background(self, rec: _Residency) -> None:
        try:
            packed = self.store.load(rec.entry)
        except Exception as e:  # noqa: BLE001 - any failure must reach the handle, not the thread
            error = (
                e
                if isinstance(e, JaxloraError)
                else AdapterError(
                    f"adapter {rec.entry.name!r} ({rec.entry.source}): loading failed: {e!r}"
                )
            )
            with self._lock:
                if not rec.dead:
                    self._load_failures += 1
                    self._free(rec)
                rec.error = error
                rec.state = _State.FAILED
            return
        with self._lock:
            if not rec.dead:
                self._queue(rec, packed)

    def _allocate(self, entry: AdapterEntry) -> dict[str, list[int]]:
        need = entry.footprint.pages_needed(self._rows_per_page)
        short = {
            axis: n - self.allocators[axis].free_pages
            for axis, n in need.items()
            if n > self.allocators[axis].free_pages
        }
        if short:
            pinned = {
                axis: sum(
                    len(rec.pages[axis])
                    for rec in self._residents.values()
                    if self._is_pinned(rec) and rec.entry is not entry
                )
                for axis in short
            }
            never = [
                axis
                for axis in short
                if need[axis] > self.pool_config.pages_in(axis) - pinned[axis]
            ]
            if never:
                # (not a retry later: pinned adapters are never evicted)
                raise AdapterError(
                    f"adapter {entry.name!r} (rank {entry.footprint.max_rank}) cannot fit in "
                    "the adapter page pool beside the pinned adapters ("
                    + ", ".join(
                        f"{axis}: needs {need[axis]} of {self.pool_config.pages_in(axis)} pages, "
                        f"{pinned[axis]} pinned"
                        for axis in never
                    )
                    + "); unpin some or size the pool larger"
                )
            victims = [rec for rec in self._residents.values() if self._evictable(rec)]
            reclaimable = {axis: sum(len(rec.pages[axis]) for rec in victims) for axis in short}
            if any(reclaimable[axis] < n for axis, n in short.items()):
                detail = ", ".join(
                    f"{axis}: needs {need[axis]}, {self.allocators[axis].free_pages} free + "
                    f"{reclaimable[axis]} evictable of {self.pool_config.pages_in(axis)}"
                    for axis in short
                )
                raise PoolExhaustedError(
                    f"adapter {entry.name!r} (rank {entry.footprint.max_rank}) does not fit in "
                    f"the adapter page pool ({detail}); the rest is held by referenced or "
                    "pinned adapters; retry after some are released"
                )
            for rec in victims:  # least recently used first
                if not short:
                    break
                if not any(rec.pages[axis] for axis in short):
                    continue  # would free nothing where pages are missing
                self._free(rec)
                self._evictions += 1
                short = {
                    axis: n - self.allocators[axis].free_pages
                    for axis, n in need.items()
                    if n > self.allocators[axis].free_pages
                }
        return {axis: self.allocators[axis].allocate(n) for axis, n in need.items()}

    def _evictable(self, rec: _Residency) -> bool:
        return not rec.refs and not rec.dead and not self._is_pinned(rec)

    def _is_pinned(self, rec: _Residency) -> bool:
        return rec.entry.name in self._pinned and self.store.current(rec.entry.name) is rec.entry

    def _free(self, rec: _Residency) -> None:
        """Returns rec's pages; a transfer or scatter already issued for it is masked or
        harmless (a later owner's scatter is issued after it)."""
        for axis, pages in rec.pages.items():
            self.allocators[axis].free(pages)
        rec.dead = True
        rec.packed = None
        self._residents.pop(rec.entry.key, None)
        if rec.state is _State.QUEUED:
            self._queued.remove(rec)

    def _retire_stale(self, name: str) -> None:
        current = self.store.current(name)
        for rec in [r for r in self._residents.values() if r.entry.name == name]:
            if rec.entry is not current and not rec.refs:
                self._free(rec)

    def _issue_transfers(self) -> None:
        in_flight = sum(rec.packed.nbytes for rec in self._staged if rec.packed is not None)
        group = []
        while self._queued:
            nbytes = self._queued[0].packed.nbytes
            if (group or in_flight) and in_flight + nbytes > self.config.max_copy_bytes_in_flight:
                break
            group.append(self._queued.popleft())
            in_flight += nbytes
        if not group:
            return
        blocks = [rec.packed.blocks for rec in group]
        shardings = [{axis: self._shardings[axis] for axis in b} for b in blocks]
        for rec, stage in zip(group, jax.device_put(blocks, shardings), strict=True):
            rec.stage = stage
            rec.state = _State.STAGED
            self._staged.append(rec)
            self._bytes_copied += rec.packed.nbytes
        self._transfer_batches += 1

    def _issue_scatters(self) -> None:
        while self._staged:
            rec = self._staged[0]
            if not rec.dead and not all(a.is_ready() for a in rec.stage.values()):
                break
            self._staged.popleft()
            stage, rec.stage, rec.packed = rec.stage, None, None
            if rec.dead:
                continue  # evicted since: its pages may belong to someone else now
            page_ids = {}
            for axis, block in stage.items():
                # Padding: one past the pool's last page, dropped by the scatter.
                ids = np.full(block.shape[1], self.pool_config.pages_in(axis), np.int32)
                ids[: len(rec.pages[axis])] = rec.pages[axis]
                page_ids[axis] = ids
            touched = {axis: self._pools[axis] for axis in stage}
            updated, rec.marker = _scatter_pages(touched, stage, page_ids)
            self._pools.update(updated)
            rec.state = _State.COPYING
            self._copying.append(rec)
            self._scatters += 1

    def _note_finished(self) -> None:
        while self._copying and self._copying[0].marker.is_ready():
            rec = self._copying.popleft()
            rec.marker = None
            if rec.state is _State.COPYING and not rec.dead:
                rec.state = _State.READY
                if rec.entry.name in self.store:  # (not a name unregistered meanwhile)
                    self._load_seconds[rec.entry.name] = time.perf_counter() - rec.started

    def _is_ready(self, rec: _Residency) -> bool:
        if rec.state is _State.COPYING:
            with self._lock:
                self._note_finished()
        return rec.state is _State.READY and not rec.dead

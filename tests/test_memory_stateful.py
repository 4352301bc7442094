"""Stateful property test of the adapter manager (hypothesis).

Random register / acquire / release / pin / unpin / evict / replace / unregister / poll / wait
sequences; after every step: no page owned twice, every allocated page owned by a resident
adapter, referenced and pinned adapters still resident, and every ready resident's pool rows
byte-equal to its files. At the end, releasing everything leaks nothing.
"""

import functools
import tempfile

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from memory_testing import (
    CONFIG,
    TARGET_SETS,
    assert_rows_equal,
    file_rows,
    pool_rows,
    write_adapter,
)

from jaxlora.config import LoraPoolConfig
from jaxlora.errors import AdapterError, PoolExhaustedError, UnknownAdapterError
from jaxlora.memory import AdapterManager, AdapterManagerConfig, AdapterStore, AdapterStoreConfig
from pallas_kernels import layout

NAMES = ("a", "b", "c", "d", "e")
# Room for two or three adapters at a time, so eviction and exhaustion happen often.
POOL = LoraPoolConfig(max_rank=8, rows_per_page=2, pages_per_pool=20, max_slots=8)


@functools.cache
def variants() -> tuple[str, ...]:
    """Adapter directories written once per session: ranks 1..6, various module sets."""
    root = tempfile.mkdtemp(prefix="jaxlora-stateful-")
    return tuple(
        write_adapter(root, f"v{i}", rank=1 + i, seed=i, targets=TARGET_SETS[i % len(TARGET_SETS)])
        for i in range(6)
    )


def never_fits(variant: int) -> bool:
    """Whether variant i (rank 1 + i on TARGET_SETS[i % 4]) takes more pages of a pool than the
    pool has: the store refuses to register it (it could never be resident)."""
    targets = TARGET_SETS[variant % len(TARGET_SETS)]
    need = layout.pool_pages_needed(dict.fromkeys(targets, 1 + variant), POOL.rows_per_page)
    return any(n > POOL.pages_in(axis) for axis, n in need.items())


@functools.cache
def expected_rows(path: str):
    return file_rows(path)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # A small host budget makes adapters drop back to disk and get re-read.
        store = AdapterStore(CONFIG, POOL, AdapterStoreConfig(host_budget_bytes=20_000))
        self.manager = AdapterManager(store, AdapterManagerConfig(load_workers=0))
        self.registered: dict[str, str] = {}  # name -> path of its current version
        self.entries = {}  # (name, version) -> AdapterEntry, old versions included
        self.handles = []
        self.pinned: set[str] = set()
        # (name, version) of pinned adapters seen resident: they must stay until unpinned.
        self.must_stay: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ rules

    @rule(name=st.sampled_from(NAMES), variant=st.integers(0, 5))
    def register(self, name, variant):
        path = variants()[variant]
        if name in self.registered or never_fits(variant):
            try:
                self.manager.register(name, path)
            except AdapterError as e:
                assert ("already registered" in str(e)) or (
                    never_fits(variant) and "can never be resident" in str(e)
                ), e
            else:
                raise AssertionError("a taken name or an adapter larger than the pool registered")
            return
        entry = self.manager.register(name, path)
        self.registered[name] = path
        self.entries[entry.key] = entry

    @rule(name=st.sampled_from(NAMES))
    def acquire(self, name):
        if name not in self.registered:
            try:
                self.manager.acquire(name)
            except UnknownAdapterError:
                return
            raise AssertionError("an unknown name was acquired")
        try:
            handle = self.manager.acquire(name)
        except PoolExhaustedError:
            self.check_really_exhausted(name)
            return
        except AdapterError as e:
            self.check_never_fits_beside_pinned(name, e)
            return
        assert handle.version == self.manager.store.get(name).version
        self.handles.append(handle)
        self.note_pinned_residents()

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 1000))
    def release(self, index):
        self.handles.pop(index % len(self.handles)).release()

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 1000))
    def wait(self, index):
        handle = self.handles[index % len(self.handles)]
        handle.wait(timeout=60)
        assert handle.ready

    @rule()
    def poll(self):
        self.manager.poll()

    @rule(name=st.sampled_from(NAMES))
    def pin(self, name):
        try:
            self.manager.pin(name)
        except UnknownAdapterError:
            assert name not in self.registered
        except PoolExhaustedError:
            self.check_really_exhausted(name)
        except AdapterError as e:
            self.check_never_fits_beside_pinned(name, e)
        else:
            self.pinned.add(name)
            self.note_pinned_residents()
        assert self.manager.pinned_names() == self.pinned

    @rule(name=st.sampled_from(NAMES))
    def unpin(self, name):
        assert self.manager.unpin(name) == (name in self.pinned)
        self.pinned.discard(name)
        self.must_stay = {k for k in self.must_stay if k[0] != name}

    @rule(name=st.sampled_from(NAMES))
    def evict(self, name):
        entry = self.manager.store.current(name)
        protected = entry is not None and (
            name in self.pinned or any(h.version == entry.version for h in self.handles)
        )
        evicted = self.manager.evict(name)
        assert not (evicted and protected), "a pinned or referenced adapter was evicted"

    @rule(name=st.sampled_from(NAMES), variant=st.integers(0, 5))
    def replace(self, name, variant):
        path = variants()[variant]
        if never_fits(variant):  # the files are read before the name is looked up
            with pytest.raises(AdapterError, match="can never be resident"):
                self.manager.replace(name, path)
            return  # a current version stays
        if name not in self.registered:
            try:
                self.manager.replace(name, path)
            except UnknownAdapterError:
                return
            raise AssertionError("an unknown name was replaced")
        entry = self.manager.replace(name, path)
        self.registered[name] = path
        self.entries[entry.key] = entry
        self.must_stay = {k for k in self.must_stay if k[0] != name}
        self.note_pinned_residents()

    @rule(name=st.sampled_from(NAMES))
    def unregister(self, name):
        try:
            self.manager.unregister(name)
        except UnknownAdapterError:
            assert name not in self.registered
            return
        del self.registered[name]
        self.pinned.discard(name)
        self.must_stay = {k for k in self.must_stay if k[0] != name}

    # ------------------------------------------------------------------ checks

    def note_pinned_residents(self):
        for r in self.manager.residents():
            if r.name in self.pinned and self.manager.store.get(r.name).version == r.version:
                self.must_stay.add((r.name, r.version))

    def check_really_exhausted(self, name):
        """PoolExhaustedError is only allowed when free + evictable pages cannot fit name."""
        need = self.manager.store.get(name).footprint.pages_needed(POOL.rows_per_page)
        held = {(h.name, h.version) for h in self.handles}
        evictable = dict.fromkeys(need, 0)
        for r in self.manager.residents():
            if (r.name, r.version) not in held and not r.pinned:
                for axis in need:
                    evictable[axis] += len(r.pages[axis])
        assert any(
            self.manager.allocators[a].free_pages + evictable[a] < n for a, n in need.items()
        ), "refused although eviction could make room"

    def check_never_fits_beside_pinned(self, name, error):
        """That AdapterError is only allowed when the pinned adapters' pages leave too few."""
        assert "beside the pinned adapters" in str(error), error
        need = self.manager.store.get(name).footprint.pages_needed(POOL.rows_per_page)
        pinned = dict.fromkeys(need, 0)
        for r in self.manager.residents():
            if r.pinned and r.name != name:
                for axis in need:
                    pinned[axis] += len(r.pages[axis])
        assert any(n > POOL.pages_in(a) - pinned[a] for a, n in need.items()), (
            "refused for pinned adapters that leave room"
        )

    @invariant()
    def pages_are_owned_once_and_weights_match_files(self):
        residents = self.manager.residents()
        for axis, allocator in self.manager.allocators.items():
            owned = [p for r in residents for p in r.pages[axis]]
            assert len(owned) == len(set(owned)), f"{axis}: a page is owned twice"
            assert set(owned) == allocator.allocated_pages(), f"{axis}: leaked pages"
        present = {(r.name, r.version): r for r in residents}
        for h in self.handles:
            assert (h.name, h.version) in present, "a referenced adapter was evicted"
            assert present[h.name, h.version].refs == sum(
                1 for g in self.handles if (g.name, g.version) == (h.name, h.version)
            )
        assert self.must_stay <= set(present), "a pinned adapter was evicted"
        ready = [r for r in residents if r.state == "ready"]
        if ready:
            pools = {axis: np.asarray(a) for axis, a in self.manager.pools.items()}
            for r in ready:
                entry = self.entries[r.name, r.version]
                slot = entry.footprint.slot_info(
                    {a: list(p) for a, p in r.pages.items()}, POOL.rows_per_page
                )
                assert_rows_equal(
                    expected_rows(entry.source), pool_rows(pools, slot, POOL.rows_per_page), r.name
                )

    def teardown(self):
        for handle in self.handles:
            handle.release()
        for name in list(self.pinned):
            self.manager.unpin(name)
        self.manager.evict_all_unused()
        assert not self.manager.residents()
        assert all(a.used_pages == 0 for a in self.manager.allocators.values()), "leak"
        self.manager.close()


ManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestAdapterManagerStateMachine = ManagerMachine.TestCase

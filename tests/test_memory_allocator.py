"""PageAllocator: exclusive ownership, all-or-nothing allocation, atomic free, usage figures."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.errors import JaxloraError, PoolExhaustedError
from jaxlora.memory import PageAllocator, PageAllocatorError


def test_allocate_hands_out_distinct_pages_and_free_returns_them():
    alloc = PageAllocator(8)
    first, second = alloc.allocate(3), alloc.allocate(5)
    assert sorted(first + second) == list(range(8))
    assert alloc.free_pages == 0 and alloc.used_pages == 8
    alloc.free(first)
    assert alloc.free_pages == 3
    assert sorted(alloc.allocate(3)) == sorted(first)
    assert alloc.allocate(0) == []


def test_exhaustion_is_all_or_nothing():
    alloc = PageAllocator(4, name="kv")
    alloc.allocate(3)
    with pytest.raises(PoolExhaustedError, match=r"'kv': 2 pages requested, 1 of 4 free"):
        alloc.allocate(2)
    assert alloc.free_pages == 1
    usage = alloc.usage()
    assert (usage.used_pages, usage.free_pages, usage.failed_allocations) == (3, 1, 1)


def test_double_free_and_bad_ids_free_nothing():
    alloc = PageAllocator(6)
    pages = alloc.allocate(4)
    alloc.free(pages[:1])
    with pytest.raises(PageAllocatorError, match="not allocated"):
        alloc.free(pages[1:3] + pages[:1])  # pages[0] was already freed
    with pytest.raises(PageAllocatorError, match="not allocated"):
        alloc.free([pages[1], pages[1]])
    with pytest.raises(PageAllocatorError, match=r"page id 6 is not in 0\.\.5"):
        alloc.free([pages[1], 6])
    with pytest.raises(PageAllocatorError, match="page id 'x'"):
        alloc.free(["x"])
    assert alloc.used_pages == 3  # none of the refused calls freed anything
    assert all(alloc.is_allocated(p) for p in pages[1:])
    assert issubclass(PageAllocatorError, JaxloraError)


def test_numpy_ids_are_accepted():
    alloc = PageAllocator(4)
    pages = np.asarray(alloc.allocate(2), np.int32)
    alloc.free(pages)
    assert alloc.free_pages == 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_bad_pool_sizes_are_refused(bad):
    with pytest.raises(PageAllocatorError, match="num_pages must be a positive int"):
        PageAllocator(bad)


@pytest.mark.parametrize("bad", [-1, 1.0, None])
def test_bad_allocation_sizes_are_refused(bad):
    with pytest.raises(PageAllocatorError, match="allocate"):
        PageAllocator(4).allocate(bad)


def test_usage_tracks_peak_and_utilization():
    alloc = PageAllocator(10)
    a = alloc.allocate(6)
    alloc.free(a[:4])
    alloc.allocate(1)
    usage = alloc.usage()
    assert usage.peak_used_pages == 6 and usage.used_pages == 3
    assert usage.utilization == pytest.approx(0.3)
    assert usage.allocations == 2


@settings(max_examples=60, deadline=None)
@given(
    num_pages=st.integers(1, 40),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 45)), max_size=60),
)
def test_random_sequences_keep_every_page_owned_exactly_once(num_pages, ops):
    alloc = PageAllocator(num_pages)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc:
            if n <= alloc.free_pages:
                held.append(alloc.allocate(n))
            else:
                with pytest.raises(PoolExhaustedError):
                    alloc.allocate(n)
        elif held:
            alloc.free(held.pop(n % len(held)))
        owned = [p for pages in held for p in pages]
        assert len(owned) == len(set(owned)), "a page owned twice"
        assert set(owned) == alloc.allocated_pages()
        assert alloc.used_pages + alloc.free_pages == num_pages
    for pages in held:
        alloc.free(pages)
    assert alloc.free_pages == num_pages and not alloc.allocated_pages()

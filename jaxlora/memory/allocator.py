"""Host-side page allocator over one fixed-size page pool on the device.

Pages all have one size, so any free page serves any request: there is no fragmentation by
construction and an allocation never needs contiguous ids. Ownership is exclusive (a page belongs
to exactly one holder until freed); sharing and reference counting live one level up, in the
adapter manager (and later the KV cache), which is why the class knows nothing about adapters.
"""

from __future__ import annotations

import dataclasses
import operator
import threading

from jaxlora.errors import JaxloraError, PoolExhaustedError


class PageAllocatorError(JaxloraError):
    """A page id given to the allocator is out of range, not allocated, or repeated."""


@dataclasses.dataclass(frozen=True)
class PoolUsage:
    """Usage figures of one page pool at one moment."""

    num_pages: int
    used_pages: int
    free_pages: int
    peak_used_pages: int
    allocations: int  # successful allocate() calls since creation
    failed_allocations: int  # allocate() calls refused for lack of pages

    @property
    def utilization(self) -> float:
        return self.used_pages / self.num_pages


class PageAllocator:
    """Free list of page ids 0..num_pages-1; allocate(n) and free(ids) cost O(n).

    Thread-safe. Freed pages are handed out again first (LIFO), which keeps the working set of
    page ids small.
    """

    def __init__(self, num_pages: int, *, name: str = "pool"):
        if not isinstance(num_pages, int) or num_pages <= 0:
            raise PageAllocatorError(
                f"page allocator {name!r}: num_pages must be a positive int, got {num_pages!r}"
            )
        self.name = name
        self.num_pages = num_pages
        # Popping from the end hands out page 0 first on a fresh pool.
        self._free = list(range(num_pages - 1, -1, -1))
        self._allocated = bytearray(num_pages)
        self._peak_used = 0
        self._allocations = 0
        self._failed_allocations = 0
        self._lock = threading.Lock()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Takes n free pages, all or none; raises PoolExhaustedError when fewer are free."""
        if not isinstance(n, int) or n < 0:
            raise PageAllocatorError(
                f"page allocator {self.name!r}: allocate(n) needs an int n >= 0, got {n!r}"
            )
        with self._lock:
            if n > len(self._free):
                self._failed_allocations += 1
                raise PoolExhaustedError(
                    f"page pool {self.name!r}: {n} pages requested, {len(self._free)} of "
                    f"{self.num_pages} free"
                )
            if n == 0:
                return []
            pages = self._free[-n:]
            del self._free[-n:]
            pages.reverse()
            for page in pages:
                self._allocated[page] = 1
            self._allocations += 1
            self._peak_used = max(self._peak_used, self.num_pages - len(self._free))
            return pages

    def free(self, pages) -> None:
        """Returns pages to the pool; every id must be allocated and appear once, else nothing is
        freed and PageAllocatorError is raised (a double free is a bug in the caller)."""
        pages = [self._check_id(page) for page in pages]
        with self._lock:
            seen = set()
            for page in pages:
                if not self._allocated[page] or page in seen:
                    raise PageAllocatorError(
                        f"page pool {self.name!r}: page {page} is not allocated (double free?)"
                    )
                seen.add(page)
            for page in reversed(pages):
                self._allocated[page] = 0
                self._free.append(page)

    def is_allocated(self, page: int) -> bool:
        return bool(self._allocated[self._check_id(page)])

    def _check_id(self, page) -> int:
        try:
            page_id = operator.index(page)
        except TypeError:
            page_id = -1
        if not 0 <= page_id < self.num_pages:
            raise PageAllocatorError(
                f"page pool {self.name!r}: page id {page!r} is not in 0..{self.num_pages - 1}"
            )
        return page_id

    def allocated_pages(self) -> set[int]:
        with self._lock:
            return {p for p in range(self.num_pages) if self._allocated[p]}

    def usage(self) -> PoolUsage:
        with self._lock:
            used = self.num_pages - len(self._free)
            return PoolUsage(
                num_pages=self.num_pages,
                used_pages=used,
                free_pages=len(self._free),
                peak_used_pages=self._peak_used,
                allocations=self._allocations,
                failed_allocations=self._failed_allocations,
            )

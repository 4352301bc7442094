"""The paged KV cache: device page pools and the host-side page tables of every sequence.

Pages come from the same generic ``PageAllocator`` as adapter pages, so the two could share one
pool later (S-LoRA's unified paging). Layout: ``(num_layers, num_pages, page_size, KVH, D)``.

Prefix caching (``KVCacheConfig.prefix_caching``, vLLM's automatic prefix caching): a
full page whose tokens are known is registered under a key chained from the keys of the pages
before it, its own tokens and the adapter version (K/V depend on the adapter's k and v
projections). A new sequence whose first pages have those keys takes the same pages (counted
references) instead of computing them again. A page no sequence holds stays cached, and is
reused only when no free page is left (least recently released first). A shared page is never
written: only full pages are shared, and a sequence writes past its last full page.

Prompt sharing (``share_prefix``), on whether prefix caching is or not: a sequence starts with
the full pages another sequence of the same prompt and adapter computed (the n choices of one
request), by counted reference.

Sliding windows (``ModelConfig.attention_window``, Mistral 7B v0.1, Phi-3-mini-4k): a
sequence's next queries never read the keys before their window, so the engine releases the
pages wholly before it (``release_before``) as the sequence goes on, as vLLM does: a 32k-token
Mistral v0.1 sequence holds the pages of its last 4,096 tokens and the chunk being computed,
not all 2,048 of its 16-token pages. A released position keeps its place in the sequence's
page list (None: page ids are still found by position) and reads as page 0 in the page table:
the attention kernels skip or mask every key before a query's window, so whatever page 0 holds
there is never used.
Steps run in dispatch order on the device (each takes the pools the previous one returned), so a
released page that a later step gives to another sequence is written only after every earlier
step that read it.

Cache dtype (``KVCacheConfig.cache_dtype``, vLLM's ``--kv-cache-dtype``): "auto" keeps K/V in
the model's dtype; the fp8 formats store them in 8 bits with a per-tensor scale of 1.0 (values
saturate at the format's largest finite value, ``paged_attention.to_cache_dtype``) and are read
back in the compute dtype: twice the pages of bf16 in the same memory, half the K/V bytes a
decode step reads.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig, require_positive_ints
from jaxlora.errors import ConfigError, RequestError
from jaxlora.memory.allocator import PageAllocator
from pallas_kernels.paged_attention import window_pages

# vLLM's --kv-cache-dtype values and the pool dtype each names (None: the model's dtype).
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": jnp.float8_e4m3fn,
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
}


def check_cache_dtype(cache_dtype) -> None:
    """ConfigError unless cache_dtype is one of KV_CACHE_DTYPES' names."""
    if not isinstance(cache_dtype, str) or cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"kv cache config field cache_dtype: expected one of {list(KV_CACHE_DTYPES)}, "
            f"got {cache_dtype!r}"
        )


def kv_pool_dtype(cache_dtype: str, model_dtype) -> jnp.dtype:
    """The dtype of the K/V pools for a ``KVCacheConfig.cache_dtype`` and the model's dtype."""
    check_cache_dtype(cache_dtype)
    named = KV_CACHE_DTYPES[cache_dtype]
    return jnp.dtype(model_dtype if named is None else named)


def kv_page_bytes(model: ModelConfig, page_size: int, dtype, *, shards: int = 1) -> int:
    """Bytes of one KV page (K and V of page_size tokens, every layer) on each of ``shards``
    devices that split the KV heads (tensor parallelism)."""
    heads = model.num_kv_heads // shards
    return 2 * model.num_layers * page_size * heads * model.head_dim * jnp.dtype(dtype).itemsize


def pages_held_at_most(num_tokens: int, page_size: int, window: int | None, chunk: int) -> int:
    """The most pages a sequence of ``num_tokens`` tokens holds at once when its steps feed at
    most ``chunk`` tokens each and it releases the pages before a sliding ``window`` (None: it
    holds them all): those its steps' keys span (``paged_attention.window_pages``)."""
    every = -(-num_tokens // page_size)
    if window is None:
        return every
    return min(every, window_pages(window, chunk, page_size))


def allocate_pools(shape, dtype, sharding, config: KVCacheConfig):
    """The K and V pools, zeroed, on the device now: an allocation the device cannot hold is a
    ConfigError here, naming the cache's size, rather than an error of the first step that
    reads the pools (JAX reports a failed allocation where its buffer is first used)."""
    try:
        pools = tuple(jax.device_put(jnp.zeros(shape, dtype), sharding) for _ in range(2))
        jax.block_until_ready(pools)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        gib = 2 * math.prod(shape) * jnp.dtype(dtype).itemsize / 2**30
        raise ConfigError(
            f"KV cache: {config.num_pages} pages of {config.page_size} tokens ({gib:.2f} GiB "
            f"in all, K and V, cache dtype {jnp.dtype(dtype).name}) do not fit in the device's "
            "memory; lower the page count (--kv_pages, --kv_cache_memory or "
            f"--gpu_memory_utilization) ({str(e).splitlines()[0]})"
        ) from None
    return pools


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    page_size: int = 16
    num_pages: int = 512
    max_model_len: int = 512  # context length a sequence may reach (prompt + output)
    # Sequences share the cached pages of a common prefix (see the module docstring).
    prefix_caching: bool = False
    # The pools' dtype: "auto" (the model's) or an fp8 format (see the module docstring).
    cache_dtype: str = "auto"

    def __post_init__(self):
        require_positive_ints(self, ("page_size", "num_pages", "max_model_len"), "kv cache config")
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError(
                "kv cache config field prefix_caching: expected a bool, got "
                f"{self.prefix_caching!r}"
            )
        check_cache_dtype(self.cache_dtype)

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


class KVCacheManager:
    """Owns the KV page pools and which pages each sequence holds."""

    def __init__(
        self,
        model: ModelConfig,
        config: KVCacheConfig,
        dtype=jnp.float32,
        *,
        sharding=None,
    ):
        """dtype: the model's (the pools' unless ``config.cache_dtype`` names an fp8 format);
        sharding: of the pool arrays (tensor parallelism splits the KV heads)."""
        self.config = config
        dtype = kv_pool_dtype(config.cache_dtype, dtype)
        shape = (
            model.num_layers,
            config.num_pages,
            config.page_size,
            model.num_kv_heads,
            model.head_dim,
        )
        # Committed to a device from the start: jit specializes on committed-ness, and the step
        # returns committed pools, so uncommitted fresh pools cost one more compilation of the
        # first bucket once serving starts.
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.k_pool, self.v_pool = allocate_pools(shape, dtype, sharding, config)
        self.allocator = PageAllocator(config.num_pages, name="kv")
        # seq -> its pages by position; None: released (before a sliding window)
        self._pages: dict[int, list[int | None]] = {}
        # seq -> its page-table row (page_table_row), kept up to date as pages come and go: a
        # step copies rows instead of converting page lists (128 rows of 2,048 pages: 0.24 ms
        # of host time a step instead of 10.9 on the CPU machine; fifty-second session)
        self._rows: dict[int, np.ndarray] = {}
        self.prefix_caching = config.prefix_caching
        self._refs: dict[int, int] = {}  # page -> sequences holding it
        self._keys: dict[int, list] = {}  # seq -> keys of its leading full pages
        # seq -> its leading positions already released (release_before walks only past them:
        # each step of a long windowed sequence touches the pages it releases, not its history)
        self._released_until: dict[int, int] = {}
        self._page_of_key: dict[object, int] = {}
        self._key_of_page: dict[int, object] = {}
        # Cached pages no sequence holds, least recently released first (still allocated in
        # the allocator's view; counted free here).
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.bytes_per_page = kv_page_bytes(model, config.page_size, dtype)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def pages_of(self, seq_id: int) -> list[int | None]:
        """The sequence's pages by position; None where ``release_before`` released one."""
        return self._pages.get(seq_id, [])

    def held_pages(self, seq_id: int) -> int:
        """Pages the sequence holds (its released positions not counted)."""
        return sum(page is not None for page in self.pages_of(seq_id))

    def pages_held_at_most(self, num_tokens: int, window: int | None, chunk: int) -> int:
        """``pages_held_at_most`` with this cache's page size."""
        return pages_held_at_most(num_tokens, self.config.page_size, window, chunk)

    def extra_pages_needed(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(self.pages_of(seq_id)))

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        """Makes room for num_tokens tokens of seq_id; False (and nothing taken) if no pages.
        RequestError (nothing taken) past the page table's max_pages_per_seq pages."""
        if self.pages_for(num_tokens) > self.config.max_pages_per_seq:
            # Checked before taking pages: the page-table row has no place for them, and pages
            # taken before that failure would leak.
            raise RequestError(
                f"KV cache: sequence {seq_id!r} needs {self.pages_for(num_tokens)} pages for "
                f"{num_tokens} tokens, past max_pages_per_seq "
                f"{self.config.max_pages_per_seq} (max_model_len "
                f"{self.config.max_model_len}, page_size {self.config.page_size})"
            )
        need = self.extra_pages_needed(seq_id, num_tokens)
        if need == 0:
            return True
        if need > self.free_pages:
            return False
        fresh = self.allocator.allocate(min(need, self.allocator.free_pages))
        while len(fresh) < need:  # the least recently released cached pages
            page, _ = self._evictable.popitem(last=False)
            del self._page_of_key[self._key_of_page.pop(page)]
            fresh.append(page)
        for page in fresh:
            self._refs[page] = 1
        pages = self._pages.setdefault(seq_id, [])
        self._row(seq_id)[len(pages) : len(pages) + len(fresh)] = fresh
        pages.extend(fresh)
        return True

    def _row(self, seq_id: int) -> np.ndarray:
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = np.zeros(self.config.max_pages_per_seq, np.int32)
        return row

    def free(self, seq_id: int) -> None:
        pages = self._pages.pop(seq_id, None)
        self._rows.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        self._released_until.pop(seq_id, None)
        self._release(pages or ())

    def release_before(self, seq_id: int, position: int) -> int:
        """Releases the sequence's pages that hold only positions before ``position`` (the
        first key its next queries read, with a sliding window); their places stay in its page
        list as None. Returns the number of pages released."""
        pages = self._pages.get(seq_id)
        if not pages or position < self.config.page_size:
            return 0
        done = self._released_until.get(seq_id, 0)
        count = min(position // self.config.page_size, len(pages))
        if count <= done:
            return 0
        released = [page for page in pages[done:count] if page is not None]
        pages[done:count] = [None] * (count - done)
        self._row(seq_id)[done:count] = 0
        self._released_until[seq_id] = count
        self._release(released)
        return len(released)

    def _release(self, pages) -> None:
        """Drops one reference to each page (None: a released position, skipped); a page no
        sequence holds any more is cached for a later sequence when registered, else freed."""
        released = []
        for page in pages:
            if page is None:
                continue
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            del self._refs[page]
            if page in self._key_of_page:
                self._evictable[page] = None  # cached for a later sequence
            else:
                released.append(page)
        if released:
            self.allocator.free(released)

    # ------------------------------------------------------------------ prefix caching

    @staticmethod
    def _next_key(previous: bytes | None, tokens, adapter_key) -> bytes:
        """A page's key: a 128-bit digest of the previous page's key, its tokens and the
        adapter version (a collision would hand a sequence another prefix's K/V)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(previous or b"")
        digest.update(np.asarray(tokens, np.int32).tobytes())
        digest.update(repr(adapter_key).encode())
        return digest.digest()

    def attach_prefix(self, seq_id: int, tokens_of, adapter_key, limit: int) -> int:
        """Gives a sequence without pages the cached pages of its longest cached prefix of
        full pages within its first ``limit`` tokens (one token at least must be left to
        compute for its logits): the number of tokens they hold (0 when off).
        ``tokens_of(start, n)``: the sequence's tokens."""
        if not self.prefix_caching or self._pages.get(seq_id):
            return 0
        size = self.config.page_size
        pages, keys, previous = [], [], None
        for start in range(0, limit - size + 1, size):
            key = self._next_key(previous, tokens_of(start, size), adapter_key)
            page = self._page_of_key.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            previous = key
        if pages:
            self._hold(seq_id, pages, keys)
        return len(pages) * size

    def share_prefix(
        self, source_id: int, seq_id: int, num_tokens: int, window: int | None = None
    ) -> int:
        """Gives a sequence without pages the source sequence's pages that its first
        num_tokens tokens fill (full pages only, which the source never writes again; counted
        references): the number of tokens they hold. The caller vouches that the two sequences'
        first num_tokens tokens and adapter version are the same. With a sliding ``window``
        nothing is shared unless the source still holds every page the sequence's next query
        reads: a source past the shared tokens may have released pages inside that window
        (release_before), and those places would read as page 0, another sequence's keys."""
        if self._pages.get(seq_id):
            return 0
        source = self._pages.get(source_id, ())
        size = self.config.page_size
        count = min(num_tokens // size, len(source))
        if not count:
            return 0
        if window is not None:
            first_read = max(0, count * size - window + 1) // size
            if any(page is None for page in source[first_read:count]):
                return 0
        self._hold(seq_id, source[:count], self._keys.get(source_id, [])[:count])
        return count * size

    def _hold(self, seq_id: int, pages: list[int], keys: list) -> None:
        """A sequence without pages takes pages another sequence computed, by counted
        reference (a cached page no sequence held leaves the evictable list); keys: those of
        its leading pages, as far as they are registered (prefix caching)."""
        for page in pages:
            if page is None:  # released by the source: before this sequence's window too
                continue
            self._evictable.pop(page, None)
            self._refs[page] = self._refs.get(page, 0) + 1
        self._pages[seq_id] = list(pages)
        row = self._rows[seq_id] = np.zeros(self.config.max_pages_per_seq, np.int32)
        row[: len(pages)] = [0 if page is None else page for page in pages]
        if keys:
            self._keys[seq_id] = list(keys)

    def register_full_pages(self, seq_id: int, tokens_of, adapter_key, known: int) -> None:
        """Registers the sequence's pages that its first ``known`` tokens fill (written, or
        being written by dispatched steps) for later sequences; ``tokens_of(start, n)``: the
        sequence's tokens."""
        if not self.prefix_caching:
            return
        pages = self._pages.get(seq_id, [])
        keys = self._keys.setdefault(seq_id, [])
        size = self.config.page_size
        while len(keys) < min(known // size, len(pages)):
            i = len(keys)
            key = self._next_key(keys[-1] if keys else None, tokens_of(i * size, size), adapter_key)
            keys.append(key)
            page = pages[i]
            if page is None:  # released before its tokens were known: nothing to cache
                continue
            if key not in self._page_of_key and page not in self._key_of_page:
                self._page_of_key[key] = page
                self._key_of_page[page] = key

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix: pages no sequence holds return to the pool, held ones
        stay with their sequences (registered again as those sequences go on). The number of
        pages that were registered."""
        dropped = len(self._key_of_page)
        released = list(self._evictable)
        self._evictable.clear()
        self._page_of_key.clear()
        self._key_of_page.clear()
        self._keys.clear()
        if released:
            self.allocator.free(released)
        return dropped

    def page_table_row(self, seq_id: int) -> np.ndarray:
        """The sequence's page ids by position, 0 past its last page and where a page was
        released (never read: see the module docstring). A read-only view of the row the
        cache keeps: it changes as the sequence's pages do, so copy it to keep it."""
        row = self._rows.get(seq_id)
        if row is None:
            row = np.zeros(self.config.max_pages_per_seq, np.int32)
        view = row.view()
        view.flags.writeable = False
        return view

    @property
    def free_pages(self) -> int:
        """Pages a sequence can take: free ones and cached ones no sequence holds."""
        return self.allocator.free_pages + len(self._evictable)

    @property
    def cached_pages(self) -> int:
        """Pages registered for prefix caching (held by sequences or not)."""
        return len(self._key_of_page)

    @property
    def num_sequences(self) -> int:
        return len(self._pages)

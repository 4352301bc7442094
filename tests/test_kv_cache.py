"""The KV cache manager's page bookkeeping with prefix caching and prompt sharing, under random
operations; its pools' dtype (KVCacheConfig.cache_dtype)."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import TINY
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager, kv_pool_dtype
from jaxlora.errors import ConfigError, RequestError


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_share_only_pages_of_their_own_prefix(seed):
    """Sequences of a few shared prefixes and adapters come and go: a sequence is only ever
    given cached pages whose contents (tracked here as written) are its own tokens under its
    own adapter; every page is held, cached or free, never two of them; reference counts match
    the holders; a pool of only free and cached pages reports every page free. Some sequences
    start from a live one's prompt (``share_prefix``: the n choices of a request); some
    release their first pages (``release_before``: a sliding window), which a later sharer
    takes as released positions. Each live sequence's page-table row (kept by the cache as
    its pages change) is its page list's."""
    rng = np.random.default_rng(seed)
    size, num_pages = 4, 14
    kv = KVCacheManager(
        TINY,
        KVCacheConfig(page_size=size, num_pages=num_pages, max_model_len=32, prefix_caching=True),
    )
    prefixes = [list(rng.integers(0, 5, 12)) for _ in range(3)]
    written: dict[int, tuple] = {}  # page -> (adapter, tokens) its owner wrote there
    live: dict[int, tuple] = {}  # seq -> (adapter, tokens)
    next_id, hits, shares = 0, 0, 0
    resets = releases = 0
    for _ in range(400):
        if live and rng.random() < 0.1:
            seq = int(rng.choice(list(live)))
            before = kv.pages_of(seq)[:]
            position = int(rng.integers(0, len(live[seq][1]) + 1))
            released = kv.release_before(seq, position)
            count = min(position // size, len(before))
            assert released == sum(page is not None for page in before[:count])
            assert kv.pages_of(seq) == [None] * count + before[count:]
            assert kv.page_table_row(seq)[:count].tolist() == [0] * count
            releases += released > 0
        elif rng.random() < 0.03:  # (a reset: no page is cached, held ones stay held)
            registered = kv.cached_pages
            assert kv.reset_prefix_cache() == registered
            assert kv.cached_pages == 0 and not kv._evictable
            resets += 1
        elif live and rng.random() < 0.4:
            seq = int(rng.choice(list(live)))
            kv.free(seq)
            del live[seq]
        else:
            source = None
            if live and rng.random() < 0.3:
                source = int(rng.choice(list(live)))
                adapter, source_tokens = live[source]
                common = int(rng.integers(1, len(source_tokens) + 1))
                tokens = source_tokens[:common] + list(rng.integers(0, 5, rng.integers(1, 10)))
            else:
                adapter = int(rng.integers(0, 2))
                tokens = prefixes[rng.integers(0, 3)][: rng.integers(1, 13)] + list(
                    rng.integers(0, 5, rng.integers(1, 10))
                )
            seq, next_id = next_id, next_id + 1

            def tokens_of(start, n, tokens=tokens):
                return tokens[start : start + n]

            cached = 0
            if source is not None:
                cached = kv.share_prefix(source, seq, min(common, len(tokens) - 1))
                shares += cached > 0
            cached = cached or kv.attach_prefix(seq, tokens_of, adapter, len(tokens) - 1)
            assert cached % size == 0 and cached <= len(tokens) - 1
            for i, page in enumerate(kv.pages_of(seq)):
                if page is not None:
                    assert written[page] == (adapter, tuple(tokens[i * size : (i + 1) * size]))
            hits += cached > 0
            if not kv.ensure(seq, len(tokens)):
                kv.free(seq)
                continue
            for i, page in enumerate(kv.pages_of(seq)[cached // size :], cached // size):
                written[page] = (adapter, tuple(tokens[i * size : (i + 1) * size]))
            kv.register_full_pages(seq, tokens_of, adapter, len(tokens))
            live[seq] = (adapter, tokens)
        for s in live:  # (the rows kept up to date are the rows of the page lists)
            expected = np.zeros(kv.config.max_pages_per_seq, np.int32)
            expected[: len(kv.pages_of(s))] = [page or 0 for page in kv.pages_of(s)]
            np.testing.assert_array_equal(kv.page_table_row(s), expected)
        assert set(kv._rows) == set(live)
        held = [p for s in live for p in kv.pages_of(s) if p is not None]
        distinct = set(held)
        for page in distinct:
            assert kv._refs[page] == held.count(page)
        assert not distinct & set(kv._evictable)
        assert set(kv._refs) == distinct
        assert kv.allocator.allocated_pages() == distinct | set(kv._evictable)
        assert kv.free_pages == num_pages - len(distinct)
        for key, page in kv._page_of_key.items():
            assert kv._key_of_page[page] == key
    assert hits > 10 and shares > 10 and resets and releases > 5
    for seq in list(live):
        kv.free(seq)
    assert kv.free_pages == num_pages and not kv._refs


def test_without_prefix_caching_nothing_is_cached_and_pages_return():
    kv = KVCacheManager(TINY, KVCacheConfig(page_size=4, num_pages=6, max_model_len=16))
    tokens = list(range(12))
    assert kv.attach_prefix(0, lambda s, n: tokens[s : s + n], None, 11) == 0
    assert kv.ensure(0, 12)
    kv.register_full_pages(0, lambda s, n: tokens[s : s + n], None, 12)
    assert kv.cached_pages == 0
    kv.free(0)
    assert kv.allocator.free_pages == 6
    assert kv.attach_prefix(1, lambda s, n: tokens[s : s + n], None, 11) == 0
    with pytest.raises(ConfigError, match="prefix_caching: expected a bool"):
        KVCacheConfig(prefix_caching=1)


def test_room_past_the_page_table_is_refused_and_takes_nothing():
    """A sequence asking for more pages than its page-table row has (max_pages_per_seq) gets a
    RequestError naming the limit, and no page is taken (none leaks from the pool)."""
    kv = KVCacheManager(TINY, KVCacheConfig(page_size=4, num_pages=16, max_model_len=8))
    assert kv.ensure("a", 8)  # exactly the two pages of the row
    with pytest.raises(RequestError, match=r"3 pages for 9 tokens, past max_pages_per_seq 2"):
        kv.ensure("a", 9)
    with pytest.raises(RequestError, match="max_model_len 8"):
        kv.ensure("b", 12)
    assert kv.free_pages == 16 - 2 and kv.pages_of("b") == [] and len(kv.pages_of("a")) == 2
    kv.free("a")
    assert kv.free_pages == 16 and not kv._refs and not kv.allocator.allocated_pages()


def test_shared_prompt_pages_outlive_their_first_holder_without_prefix_caching():
    """share_prefix gives only full pages, by reference: they return to the pool when the
    last holder frees them."""
    kv = KVCacheManager(TINY, KVCacheConfig(page_size=4, num_pages=8, max_model_len=16))
    assert kv.ensure("a", 10)  # pages 0..2, the third half full
    assert kv.share_prefix("a", "b", 9) == 8  # the two full pages
    assert kv.share_prefix("a", "b", 9) == 0  # b has pages already
    assert kv.share_prefix("missing", "c", 8) == 0 and kv.pages_of("c") == []
    assert kv.pages_of("b") == kv.pages_of("a")[:2]
    assert kv.ensure("b", 10) and kv.pages_of("b")[2] not in kv.pages_of("a")
    kv.free("a")
    assert kv.free_pages == 8 - 3  # b's three
    kv.free("b")
    assert kv.free_pages == 8 and not kv._refs


def test_pages_before_a_window_are_released_and_their_places_kept():
    """``release_before``: the pages holding only positions before the given one go back
    (cached when registered), their places stay (later pages keep their positions in the page
    table), and a sequence past its window holds a bounded number of pages."""
    size = 4
    kv = KVCacheManager(
        TINY, KVCacheConfig(page_size=size, num_pages=8, max_model_len=64, prefix_caching=True)
    )
    tokens = list(range(40))

    def tokens_of(start, n):
        return tokens[start : start + n]

    assert kv.ensure("a", 10)  # three pages
    first = kv.pages_of("a")[:]
    kv.register_full_pages("a", tokens_of, None, 8)  # the two full ones
    assert kv.release_before("a", 3) == 0  # page 0 still holds position 3
    assert kv.release_before("a", 4) == 1 and kv.pages_of("a") == [None, *first[1:]]
    assert kv.held_pages("a") == 2 and kv.free_pages == 8 - 2
    assert kv.release_before("a", 4) == 0  # nothing left before it
    row = kv.page_table_row("a")
    assert row[:3].tolist() == [0, *first[1:]] and not row[3:].any()
    # The released page was registered: cached (another sequence of this prefix takes it).
    assert kv.cached_pages == 2 and first[0] in kv._evictable
    assert kv.attach_prefix("b", tokens_of, None, 20) == 8 and kv.pages_of("b") == first[:2]
    kv.free("b")
    # Sharing a sequence's prompt gives its released places as released.
    assert kv.share_prefix("a", "c", 8) == 8 and kv.pages_of("c") == [None, first[1]]
    assert kv._refs[first[1]] == 2
    kv.free("c")
    # With a window the next query's keys must all be held: from position 8, a window of 6
    # reads position 3 (page 0, released), one of 5 from position 4 (page 1, held).
    assert kv.share_prefix("a", "c", 8, window=6) == 0 and kv.pages_of("c") == []
    assert kv.share_prefix("a", "c", 8, window=5) == 8 and kv.pages_of("c") == [None, first[1]]
    kv.free("c")
    # A window of 6 keys, steps of 2 tokens: the sequence walks 40 tokens in 8 pages' room.
    window, chunk = 6, 2
    bound = kv.pages_held_at_most(40, window, chunk)
    assert bound == -(-(window - 1 + chunk) // size) + 1 == 3
    assert kv.pages_held_at_most(40, None, chunk) == 10 == kv.pages_for(40)
    assert kv.pages_held_at_most(5, window, chunk) == 2  # the sequence's own pages
    most = 0
    for done in range(10, 40, chunk):
        kv.release_before("a", done - window + 1)
        assert kv.ensure("a", done + chunk)
        most = max(most, kv.held_pages("a"))
    assert most == bound and len(kv.pages_of("a")) == 10
    kv.free("a")
    assert kv.free_pages == 8 and not kv._refs


@pytest.mark.parametrize(
    ("model_dtype", "shrink"), [(jnp.bfloat16, 2), (jnp.float32, 4)], ids=["bf16", "f32"]
)
def test_cache_dtype_picks_the_pools_dtype_and_their_bytes(model_dtype, shrink):
    """cache_dtype "auto": the model's dtype; the fp8 names: their format, a page taking a half
    (bf16) or a quarter (float32) of the bytes."""
    config = KVCacheConfig(page_size=4, num_pages=6, max_model_len=16)
    auto = KVCacheManager(TINY, config, dtype=model_dtype)
    assert auto.k_pool.dtype == auto.v_pool.dtype == model_dtype
    assert (
        auto.bytes_per_page
        == 2 * TINY.num_layers * 4 * TINY.kv_size * jnp.dtype(model_dtype).itemsize
    )
    for name, fp8 in (
        ("fp8", jnp.float8_e4m3fn),
        ("fp8_e4m3", jnp.float8_e4m3fn),
        ("fp8_e5m2", jnp.float8_e5m2),
    ):
        assert kv_pool_dtype(name, model_dtype) == fp8
        kv = KVCacheManager(TINY, dataclasses.replace(config, cache_dtype=name), model_dtype)
        assert kv.k_pool.dtype == kv.v_pool.dtype == fp8, name
        assert kv.bytes_per_page * shrink == auto.bytes_per_page
    assert kv_pool_dtype("auto", model_dtype) == model_dtype


def test_a_bad_cache_dtype_names_the_field_and_the_accepted_values():
    accepted = r"\['auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'\]"
    for bad in ("fp16", "FP8", jnp.float8_e4m3fn, None):
        with pytest.raises(
            ConfigError,
            match=rf"kv cache config field cache_dtype: expected one of {accepted}, "
            rf"got {re.escape(repr(bad))}",
        ):
            KVCacheConfig(cache_dtype=bad)

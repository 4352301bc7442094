"""The KV cache manager's page bookkeeping with prefix caching, under random operations."""

from __future__ import annotations

import numpy as np
import pytest

from configs.models import TINY
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager
from jaxlora.errors import ConfigError


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_share_only_pages_of_their_own_prefix(seed):
    """Sequences of a few shared prefixes and adapters come and go: a sequence is only ever
    given cached pages whose contents (tracked here as written) are its own tokens under its
    own adapter; every page is held, cached or free, never two of them; reference counts match
    the holders; a pool of only free and cached pages reports every page free."""
    rng = np.random.default_rng(seed)
    size, num_pages = 4, 14
    kv = KVCacheManager(
        TINY,
        KVCacheConfig(page_size=size, num_pages=num_pages, max_model_len=32, prefix_caching=True),
    )
    prefixes = [list(rng.integers(0, 5, 12)) for _ in range(3)]
    written: dict[int, tuple] = {}  # page -> (adapter, tokens) its owner wrote there
    live: dict[int, tuple] = {}  # seq -> (adapter, tokens)
    next_id, hits = 0, 0
    for _ in range(400):
        if live and rng.random() < 0.4:
            seq = int(rng.choice(list(live)))
            kv.free(seq)
            del live[seq]
        else:
            adapter = int(rng.integers(0, 2))
            tokens = prefixes[rng.integers(0, 3)][: rng.integers(1, 13)] + list(
                rng.integers(0, 5, rng.integers(1, 10))
            )
            seq, next_id = next_id, next_id + 1

            def tokens_of(start, n, tokens=tokens):
                return tokens[start : start + n]

            cached = kv.attach_prefix(seq, tokens_of, adapter, len(tokens) - 1)
            assert cached % size == 0 and cached <= len(tokens) - 1
            for i, page in enumerate(kv.pages_of(seq)):
                assert written[page] == (adapter, tuple(tokens[i * size : (i + 1) * size]))
            hits += cached > 0
            if not kv.ensure(seq, len(tokens)):
                kv.free(seq)
                continue
            for i, page in enumerate(kv.pages_of(seq)[cached // size :], cached // size):
                written[page] = (adapter, tuple(tokens[i * size : (i + 1) * size]))
            kv.register_full_pages(seq, tokens_of, adapter, len(tokens))
            live[seq] = (adapter, tokens)
        held = [p for s in live for p in kv.pages_of(s)]
        distinct = set(held)
        for page in distinct:
            assert kv._refs[page] == held.count(page)
        assert not distinct & set(kv._evictable)
        assert set(kv._refs) == distinct
        assert kv.allocator.allocated_pages() == distinct | set(kv._evictable)
        assert kv.free_pages == num_pages - len(distinct)
        for key, page in kv._page_of_key.items():
            assert kv._key_of_page[page] == key
    assert hits > 10
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

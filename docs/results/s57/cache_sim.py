"""Fifty-seventh session: the prefix cache's hit rate on the system-prompt trace, replayed on
the host through the engine's own KVCacheManager (no model, no GPU), under its LRU eviction and
two other orders.

A request: its adapter's 1,024-token system prompt, then its own prompt and output (uniform in
[8, 256] each); 54 requests run at once (the H100 run's mean decode rows), the one due first
leaves when another must come in or pages run short; 5,000 pages of 16 tokens; the adapter by
S-LoRA's popularity (uniform at alpha 1) or Zipf(1). Printed: the share of prompt tokens found
cached at admission (the H100's call 2: 88.4% at 5 adapters, 47.8% at 100, uniform).

    JAX_PLATFORMS=cpu PYTHONPATH=. python docs/results/s57/cache_sim.py
"""

import dataclasses

import numpy as np

from configs.models import TINY
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager

PREFIX = 1024


def replay(num_adapters, *, zipf=False, pages=5000, running=54, requests=3000, seed=0):
    model = dataclasses.replace(TINY, num_layers=1, num_kv_heads=1, head_dim=8)
    config = KVCacheConfig(page_size=16, num_pages=pages, max_model_len=1536, prefix_caching=True)
    kv = KVCacheManager(model, config)
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 30000, PREFIX)) for _ in range(num_adapters)]
    weights = 1 / np.arange(1, num_adapters + 1)
    live = []  # (due, id, tokens, adapter)

    def leave():
        live.sort(key=lambda item: item[0])
        _, seq, tokens, adapter = live.pop(0)
        kv.register_full_pages(seq, lambda s, n: tokens[s : s + n], adapter, len(tokens))
        kv.free(seq)

    cached = total = 0
    for i in range(requests):
        a = int(
            rng.choice(num_adapters, p=weights / weights.sum())
            if zipf
            else rng.integers(num_adapters)
        )
        own = list(rng.integers(3, 30000, int(rng.integers(8, 257))))
        out = list(rng.integers(3, 30000, int(rng.integers(8, 257))))
        tokens, prompt_len = prompts[a] + own + out, PREFIX + len(own)
        while len(live) >= running:
            leave()
        got = kv.attach_prefix(i, lambda s, n, t=tokens: t[s : s + n], a, prompt_len - 1)
        while not kv.ensure(i, len(tokens)):
            leave()
        kv.register_full_pages(i, lambda s, n, t=tokens: t[s : s + n], a, prompt_len)
        cached += got
        total += prompt_len
        live.append((i + running * len(out) / 132, i, tokens, a))
    return cached / total


def main():
    free, register = KVCacheManager.free, KVCacheManager.register_full_pages

    def free_tail_first(self, seq_id):  # vLLM v1's order: a request's last pages go first
        pages = self._pages.pop(seq_id, None)
        for table in (self._rows, self._keys, self._released_until):
            table.pop(seq_id, None)
        self._release(list(reversed(pages or ())))

    def register_system_prompts_only(self, seq_id, tokens_of, adapter_key, known):  # an oracle
        return register(self, seq_id, tokens_of, adapter_key, min(known, PREFIX))

    for name, patch in (
        ("LRU (the engine's)", {}),
        ("a request's tail pages first", {"free": free_tail_first}),
        (
            "oracle: only system prompts cached",
            {"register_full_pages": register_system_prompts_only},
        ),
    ):
        for attr, fn in patch.items():
            setattr(KVCacheManager, attr, fn)
        row = [replay(n, zipf=z) for z in (False, True) for n in (5, 100, 400)]
        KVCacheManager.free, KVCacheManager.register_full_pages = free, register
        print(f"{name:38s}", "  ".join(f"{100 * x:5.1f}%" for x in row))


if __name__ == "__main__":
    print(f"{'':38s}", "uniform: 5 / 100 / 400 adapters; Zipf(1): 5 / 100 / 400")
    main()

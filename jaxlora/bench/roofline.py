"""The bytes a decode step must move through device memory, and the time they take at a measured
copy bandwidth: the floor no implementation of the step beats (decode is memory-bound: every
weight is read once for a few rows of arithmetic).

A decode step of B rows reads, at the least:

- every base weight once: per layer q, k, v, o, gate, up, down and two RMSNorm scales; the final
  norm and the LM head; and the B embedding rows of its tokens (a gather: the embedding table is
  not read whole, unless it is tied to the LM head, which reads it whole anyway);
- the K and V of every cached token of every row (seq_len tokens, the new one included), at the
  KV cache's itemsize (1 byte with an fp8 cache, ``KVCacheConfig.cache_dtype``);
- each distinct adapter of the step once: A and B rank-rows of every targeted weight, every layer.

Activations, the KV written for the new tokens, logits and metadata are a few MB at most and are
left out: the floor is a lower bound.

Prefill is compute-bound instead: ``prefill_flops`` counts the arithmetic of computing prompt
positions, whose floor is its time at a measured matmul rate.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from jaxlora.config import ModelConfig
from pallas_kernels.layout import MODULES


@dataclasses.dataclass(frozen=True)
class DecodeStepBytes:
    weights: int
    kv_read: int
    adapters: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_read + self.adapters

    def seconds(self, bandwidth_gbps: float) -> float:
        """The step's floor at a bandwidth in GB/s (1e9 bytes per second)."""
        return self.total / (bandwidth_gbps * 1e9)


def base_weight_bytes(config: ModelConfig, itemsize: int, rows: int) -> int:
    """Base-model bytes a decode step of `rows` rows reads (see the module docstring)."""
    h, q, kv, inter = (config.hidden_size, config.q_size, config.kv_size, config.intermediate_size)
    norms = 4 if config.sandwich_norms else 2
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + norms * h
    if config.qkv_bias:
        per_layer += q + 2 * kv
    if config.qk_norm:
        per_layer += 2 * config.head_dim
    lm_head = config.vocab_size * h
    embedding_rows = rows * h
    return itemsize * (config.num_layers * per_layer + h + lm_head + embedding_rows)


def kv_read_bytes(config: ModelConfig, itemsize: int, seq_lens: Iterable[int]) -> int:
    """K and V of seq_len tokens of each row, every layer (of the last ``attention_window``
    tokens where a sliding window binds: the decode kernel reads no others)."""
    per_token = config.num_layers * 2 * config.kv_size * itemsize
    window = config.attention_window
    return per_token * sum(int(n) if window is None else min(int(n), window) for n in seq_lens)


def adapter_bytes(config: ModelConfig, itemsize: int, ranks: Sequence[int]) -> int:
    """Bytes of one adapter's rank-rows; ranks: the rank of each of MODULES (0: not targeted)."""
    shapes = config.module_shapes()
    rows = sum(r * (shapes[m][0] + shapes[m][1]) for m, r in zip(MODULES, ranks, strict=True))
    return config.num_layers * rows * itemsize


def kv_tokens_read(seq_lens, page_table, page_size: int, window: int | None = None) -> int:
    """The K/V token slots a step's rows read, each page counted once: rows sharing pages (a
    cached prefix, the n choices of a prompt) read them from one place, so the floor counts
    their bytes once. seq_lens: tokens of each row (0: padding); page_table: each row's page
    ids by position; window: the sliding window (the first keys a row reads)."""
    lengths = np.asarray(seq_lens, np.int64)[:, None]
    page_table = np.asarray(page_table)
    first = np.maximum(lengths - window, 0) if window is not None else np.zeros_like(lengths)
    index = np.arange(page_table.shape[1])[None, :]
    counts = np.minimum((index + 1) * page_size, lengths) - np.maximum(index * page_size, first)
    read = counts > 0  # (padding rows, of length 0, read nothing)
    if not read.any():
        return 0
    pages, counts = page_table[read], counts[read]
    order = np.lexsort((-counts, pages))  # by page, its largest count first
    pages, counts = pages[order], counts[order]
    first_of_page = np.ones(len(pages), bool)
    first_of_page[1:] = pages[1:] != pages[:-1]
    return int(counts[first_of_page].sum())


def decode_step_bytes(
    config: ModelConfig,
    itemsize: int,
    *,
    seq_lens: Sequence[int],
    adapter_ranks: Iterable[Sequence[int]],
    kv_itemsize: int | None = None,
    kv_tokens: int | None = None,
) -> DecodeStepBytes:
    """The floor of one decode step: seq_lens of its rows (padding rows left out) and the ranks
    of each distinct adapter it uses; itemsize: of the weights and adapters, kv_itemsize: of the
    KV cache (None: itemsize); kv_tokens: the distinct K/V token slots its rows read
    (``kv_tokens_read``; None: each row's own, as when no row shares a page)."""
    kv_itemsize = itemsize if kv_itemsize is None else kv_itemsize
    if kv_tokens is None:
        kv_read = kv_read_bytes(config, kv_itemsize, seq_lens)
    else:
        kv_read = config.num_layers * 2 * config.kv_size * kv_itemsize * int(kv_tokens)
    return DecodeStepBytes(
        weights=base_weight_bytes(config, itemsize, len(seq_lens)),
        kv_read=kv_read,
        adapters=sum(adapter_bytes(config, itemsize, ranks) for ranks in adapter_ranks),
    )


def _layer_windows(config: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (None: it sees every key before it): Mistral's static one,
    or Gemma 2 / 3's and Qwen's sliding layers' (``ModelConfig.local_window``)."""
    windows = []
    for layer in range(config.num_layers):
        window = config.attention_window
        if config.local_window is not None:
            if config.max_window_layers is not None:
                sliding = layer >= config.max_window_layers
            else:
                sliding = (layer + 1) % config.sliding_period != 0
            window = config.local_window if sliding else window
        windows.append(window)
    return windows


def _keys_seen(start: int, end: int, window: int | None) -> int:
    """Keys the positions [start, end) attend to: p + 1 each, at most window."""
    if window is None or window >= end:
        return (end * (end + 1) - start * (start + 1)) // 2
    full = max(start, window)  # positions from here on see window keys each
    below = (full * (full + 1) - start * (start + 1)) // 2 if full > start else 0
    return below + window * (end - full)


def prefill_flops(config: ModelConfig, spans: Iterable[tuple[int, int]]) -> int:
    """FLOPs of computing the prompt positions [start, end) of each span (a prompt's positions
    past those whose K/V came from a cache), at the least: every layer's projections, 2 FLOPs a
    weight a position; attention, 4 FLOPs a query element a key (scores and the weighted sum)
    over the keys each position sees (itself and those before it, within its layer's sliding
    window); the LM head once a span (the logits of its last position). LoRA's arithmetic
    (rank 16: 0.4% of a 7B's) and the norms are left out."""
    h, q, kv, inter = (config.hidden_size, config.q_size, config.kv_size, config.intermediate_size)
    per_position = 2 * config.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    windows = collections.Counter(_layer_windows(config))
    flops = 0
    for start, end in spans:
        start, end = int(start), int(end)
        if end <= start:
            continue
        keys = sum(layers * _keys_seen(start, end, w) for w, layers in windows.items())
        flops += per_position * (end - start) + 4 * q * keys + 2 * config.vocab_size * h
    return flops

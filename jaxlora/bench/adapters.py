"""Thousands of benchmark adapters in host memory that holds a few.

S-LoRA's online benchmark registers up to 2,000 adapters. At the llama-2-7b shape one rank-16
adapter on the 7 modules is 80 MB in bf16: 160 GB for 2,000, more than the benchmark host's RAM
(and disk). Yet what the serving path costs per adapter does not depend on the values in it: each
registered name is its own adapter to the manager (its own GPU pages, its own host-to-device copy
on every miss, its own slot in a step). So ``AliasedAdapterStore`` registers many names over a few
*weight sets*: name i shares the packed host copy (pinned host memory on a GPU) of weight set
i mod K. Everything downstream of the store (allocation, eviction, transfers, scatters, kernels)
runs exactly as for K distinct adapters per K names; only the host RAM is shared.
"""

from __future__ import annotations

import numpy as np

from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.errors import AdapterError
from jaxlora.lora import random_lora_weights
from jaxlora.memory.packing import PackedAdapter, pack_weights, validate_weights
from jaxlora.memory.store import MEMORY_SOURCE, AdapterEntry, AdapterStore, AdapterStoreConfig
from pallas_kernels.layout import MODULES


class AliasedAdapterStore(AdapterStore):
    """An AdapterStore whose registered names may share one packed host copy of weights.

    Built on the store's memory-only registration (an entry plus its packed weights, never
    dropped); the store has no public call that takes already packed weights.
    """

    def pack(self, weights) -> PackedAdapter:
        """Validates and packs LoraWeights into the pool layout, in the store's host memory."""
        validate_weights(
            weights,
            self.model_config,
            max_rank=self.pool_config.max_rank,
            source=weights.source or MEMORY_SOURCE,
        )
        return self._to_host_memory(
            pack_weights(weights, self.model_config, self.pool_config.rows_per_page, self.dtype)
        )

    def register_alias(self, name: str, packed: PackedAdapter) -> AdapterEntry:
        """Registers name over packed weights that other names may share."""
        self._check_name(name)
        entry = AdapterEntry(
            name=name,
            version=self._new_version(),
            source=MEMORY_SOURCE,
            footprint=packed.footprint,
            nbytes=packed.nbytes,
        )
        return self._insert(entry, replace=False, packed=packed)


class AdapterPopulation:
    """Benchmark adapters: ``name_of(i)`` for any i, registered on first use, weight set i mod K.

    Every weight set has rank `rank` on all 7 modules, random non-zero A and B (normal, `std`),
    scale 0.5.
    """

    def __init__(
        self,
        store: AliasedAdapterStore,
        *,
        rank: int,
        weight_sets: int,
        name_of,
        seed: int = 0,
        std: float = 0.02,
    ):
        if not isinstance(weight_sets, int) or weight_sets < 1:
            raise AdapterError(
                f"benchmark adapters: weight_sets must be an int >= 1, got {weight_sets!r}"
            )
        self.store = store
        self.rank = rank
        self.name_of = name_of
        self.weight_sets = [
            store.pack(
                random_lora_weights(
                    store.model_config,
                    f"weights{k}",
                    rank,
                    MODULES,
                    seed=seed + k,
                    std=std,
                    dtype=np.float32,
                )
            )
            for k in range(weight_sets)
        ]
        self._registered: set[int] = set()

    @property
    def host_bytes(self) -> int:
        """Host RAM actually held by the weight sets."""
        return sum(p.nbytes for p in self.weight_sets)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.weight_sets[0].footprint.ranks

    def ensure(self, indices) -> list[str]:
        """Registers the adapters of these indices (if not yet) and returns their names."""
        names = []
        for i in indices:
            if i not in self._registered:
                self.store.register_alias(
                    self.name_of(i), self.weight_sets[i % len(self.weight_sets)]
                )
                self._registered.add(i)
            names.append(self.name_of(i))
        return names


def make_store(model: ModelConfig, pool: LoraPoolConfig, dtype: str) -> AliasedAdapterStore:
    return AliasedAdapterStore(model, pool, AdapterStoreConfig(dtype=dtype))

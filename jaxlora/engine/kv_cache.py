"""The paged KV cache: device page pools and the host-side page tables of every sequence.

Pages come from the same generic ``PageAllocator`` as adapter pages, so the two could share one
pool later (S-LoRA's unified paging). Layout: ``(num_layers, num_pages, page_size, KVH, D)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig, require_positive_ints
from jaxlora.memory.allocator import PageAllocator


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    page_size: int = 16
    num_pages: int = 512
    max_model_len: int = 512  # context length a sequence may reach (prompt + output)

    def __post_init__(self):
        require_positive_ints(self, ("page_size", "num_pages", "max_model_len"), "kv cache config")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


class KVCacheManager:
    """Owns the KV page pools and which pages each sequence holds."""

    def __init__(
        self, model: ModelConfig, config: KVCacheConfig, dtype=jnp.float32, *, sharding=None
    ):
        """sharding: of the pool arrays (tensor parallelism splits the KV heads)."""
        self.config = config
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
        self.k_pool = jax.device_put(jnp.zeros(shape, dtype), sharding)
        self.v_pool = jax.device_put(jnp.zeros(shape, dtype), sharding)
        self.allocator = PageAllocator(config.num_pages, name="kv")
        self._pages: dict[int, list[int]] = {}
        self.bytes_per_page = 2 * int(np.prod(shape[:1] + shape[2:])) * jnp.dtype(dtype).itemsize

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def pages_of(self, seq_id: int) -> list[int]:
        return self._pages.get(seq_id, [])

    def extra_pages_needed(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(self.pages_of(seq_id)))

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        """Makes room for num_tokens tokens of seq_id; False (and nothing taken) if no pages."""
        need = self.extra_pages_needed(seq_id, num_tokens)
        if need == 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        self._pages.setdefault(seq_id, []).extend(self.allocator.allocate(need))
        return True

    def free(self, seq_id: int) -> None:
        pages = self._pages.pop(seq_id, None)
        if pages:
            self.allocator.free(pages)

    def page_table_row(self, seq_id: int) -> np.ndarray:
        row = np.zeros(self.config.max_pages_per_seq, np.int32)
        pages = self.pages_of(seq_id)
        row[: len(pages)] = pages
        return row

    @property
    def free_pages(self) -> int:
        return self.allocator.free_pages

    @property
    def num_sequences(self) -> int:
        return len(self._pages)

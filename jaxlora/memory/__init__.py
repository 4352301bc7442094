"""Adapter memory: host store of every adapter, page allocator, and the manager that pages
adapters into the GPU pool on demand (S-LoRA). See manager.py for the life of a cold adapter."""

from jaxlora.memory.allocator import PageAllocator, PageAllocatorError, PoolUsage
from jaxlora.memory.manager import (
    AdapterHandle,
    AdapterManager,
    AdapterManagerConfig,
    ManagerStats,
    ResidentInfo,
)
from jaxlora.memory.packing import AdapterFootprint, PackedAdapter, pack_weights
from jaxlora.memory.store import (
    AdapterEntry,
    AdapterStore,
    AdapterStoreConfig,
    RegistrationReport,
    StoreStats,
)

__all__ = [
    "AdapterEntry",
    "AdapterFootprint",
    "AdapterHandle",
    "AdapterManager",
    "AdapterManagerConfig",
    "AdapterStore",
    "AdapterStoreConfig",
    "ManagerStats",
    "PackedAdapter",
    "PageAllocator",
    "PageAllocatorError",
    "PoolUsage",
    "RegistrationReport",
    "ResidentInfo",
    "StoreStats",
    "pack_weights",
]

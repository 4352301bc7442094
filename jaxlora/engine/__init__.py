"""The serving engine: paged KV cache, jit-compiled steps, adapter-aware scheduler."""

from jaxlora.engine.engine import Engine, EngineConfig, EngineStats
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager
from jaxlora.engine.request import Delta, FinishReason, Request, Status
from jaxlora.engine.runner import RunnerConfig

__all__ = [
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "KVCacheConfig",
    "KVCacheManager",
    "Request",
    "RunnerConfig",
    "Status",
]

"""Helpers of the adapter-memory tests: tiny PEFT adapters on disk and the rows they must put
in the page pool, read straight from the safetensors files (not through jaxlora.formats)."""

from __future__ import annotations

import os

import numpy as np
from peft_util import ALL_MODULES, peft_tensor_prefix, write_random_peft_adapter
from safetensors.numpy import load_file

from configs.models import TINY
from jaxlora.config import LoraPoolConfig, ModelConfig
from pallas_kernels.layout import MODULE_POOLS, MODULES, SlotInfo

CONFIG = TINY
# Small pages so that ranks 1..8 take 1..4 pages and pools fill up after a few adapters.
POOL = LoraPoolConfig(max_rank=8, rows_per_page=2, pages_per_pool=64, max_slots=8)

TARGET_SETS = (ALL_MODULES, ("q_proj", "v_proj"), ("o_proj", "down_proj"), ("gate_proj",))


def write_adapter(
    root,
    name: str,
    *,
    rank: int,
    seed: int,
    targets=ALL_MODULES,
    config: ModelConfig = CONFIG,
    **kwargs,
) -> str:
    return write_random_peft_adapter(
        os.path.join(os.fspath(root), name),
        config,
        rank=rank,
        target_modules=targets,
        seed=seed,
        **kwargs,
    )


def file_rows(path: str, config: ModelConfig = CONFIG) -> dict[str, tuple[np.ndarray, ...]]:
    """module -> (A rows (L, r, in), B rows (L, r, out)) exactly as stored in the file."""
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    rows = {}
    for m in MODULES:
        key = f"{peft_tensor_prefix(0, m)}.lora_A.weight"
        if key not in tensors:
            continue
        a = [
            tensors[f"{peft_tensor_prefix(layer, m)}.lora_A.weight"]
            for layer in range(config.num_layers)
        ]
        b = [
            tensors[f"{peft_tensor_prefix(layer, m)}.lora_B.weight"].T
            for layer in range(config.num_layers)
        ]
        rows[m] = (np.stack(a), np.stack(b))
    return rows


def pool_rows(
    pools: dict[str, np.ndarray], slot: SlotInfo, rows_per_page: int
) -> dict[str, tuple[np.ndarray, ...]]:
    """module -> (A rows, B rows) read back from the pools through the slot's page tables."""
    rows = {}
    for w, m in enumerate(MODULES):
        r = slot.ranks[w]
        if not r:
            continue
        got = []
        for axis, pages in zip(MODULE_POOLS[m], (slot.a_pages[w], slot.b_pages[w]), strict=True):
            pool = pools[axis]
            block = pool[:, list(pages)]  # (L, n, R, W)
            got.append(block.reshape(pool.shape[0], len(pages) * rows_per_page, -1)[:, :r])
        rows[m] = tuple(got)
    return rows


def assert_rows_equal(expected, actual, what: str = "") -> None:
    assert sorted(expected) == sorted(actual), f"{what}: modules differ"
    for m in expected:
        for factor, e, a in zip("AB", expected[m], actual[m], strict=True):
            assert e.shape == a.shape, f"{what} {m} {factor}: shape {a.shape} != {e.shape}"
            # Byte equality, not closeness: the pool must hold exactly the file's values.
            assert e.tobytes() == np.ascontiguousarray(a).astype(e.dtype).tobytes(), (
                f"{what} {m} {factor}: rows differ"
            )

"""One rules table from logical axis names to the mesh (Megatron tensor parallelism on `tp`).

q/k/v/gate/up are column-parallel (their output axis, `heads` / `kv_heads` / `mlp`, is split),
o/down are row-parallel (their input axis is split, XLA inserts the all-reduce), the vocabulary is
split for the embedding and the LM head. The adapter pools follow the same names: the `embed` pool
(A of column-parallel modules, B of row-parallel ones) is replicated, the others are split along
their width, so the LoRA path adds only the small all-reduce of the shrink output (S-LoRA's
tensor-parallel LoRA).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.model import FUSED_PROJECTIONS, fused_logical_axes, logical_axes, projections_fused
from pallas_kernels.layout import POOL_AXES

TP_AXIS = "tp"

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", None),
    ("head_dim", None),
    ("heads", TP_AXIS),
    ("kv_heads", TP_AXIS),
    ("mlp", TP_AXIS),
    ("vocab", TP_AXIS),
    ("adapter_pages", None),
    ("adapter_rows", None),
    ("batch", None),
)


def make_mesh(tp: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or tp > len(devices):
        raise ConfigError(
            f"tensor-parallel size tp={tp}: expected 1..{len(devices)} "
            f"(devices available: {len(devices)})"
        )
    return Mesh(np.array(devices[:tp]), (TP_AXIS,))


def check_divisible(config: ModelConfig, tp: int) -> None:
    for field, value in (
        ("num_heads", config.num_heads),
        ("num_kv_heads", config.num_kv_heads),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ):
        if value % tp:
            raise ConfigError(
                f"tensor-parallel size {tp}: model field {field}={value} is not divisible by it"
            )


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding of every parameter leaf, from the logical names and LOGICAL_RULES."""
    return nn.logical_to_mesh_sharding(logical_axes(config), mesh, LOGICAL_RULES)


def shard_params(params, config: ModelConfig, mesh: Mesh):
    """params: the canonical tree or fused projections (``fuse_projections(groups=tp)``)."""
    tp = mesh.shape[TP_AXIS]
    check_divisible(config, tp)
    if not projections_fused(params):
        return jax.device_put(params, param_shardings(config, mesh))
    fused_name = FUSED_PROJECTIONS["attn"][0]
    groups = params["layers"]["attn"][fused_name]["kernel"].shape[-2]
    if groups != tp:
        raise ConfigError(
            f"shard_params: params['layers']['attn']['{fused_name}'] is fused for {groups} "
            f"tensor-parallel groups; expected groups={tp} (the mesh's tp size)"
        )
    axes = fused_logical_axes(logical_axes(config))
    return jax.device_put(params, nn.logical_to_mesh_sharding(axes, mesh, LOGICAL_RULES))


def pool_logical_axes(axis: str) -> tuple[str | None, ...]:
    return ("layers", "adapter_pages", "adapter_rows", axis)


def pool_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    rules = dict(LOGICAL_RULES)
    return {
        axis: NamedSharding(mesh, PartitionSpec(*(rules[a] for a in pool_logical_axes(axis))))
        for axis in POOL_AXES
    }


def kv_pool_sharding(mesh: Mesh) -> NamedSharding:
    """KV pools (L, pages, page_size, KVH, D): each device holds its own KV heads."""
    return NamedSharding(mesh, PartitionSpec(None, None, None, TP_AXIS, None))


def fused_projection_sharding(mesh: Mesh) -> NamedSharding:
    """Fused q|k|v and gate|up kernels (L, E, groups, n) with groups = the tp size
    (jaxlora.model.fuse_projections): each device holds its own group's columns."""
    return NamedSharding(mesh, PartitionSpec(None, None, TP_AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

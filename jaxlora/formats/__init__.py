"""On-disk formats: HF Llama checkpoints, PEFT LoRA adapters, orbax checkpoints of params.

`jaxlora.formats.checkpoint` (orbax) is imported on first use, so that loading adapters does not
pay for importing orbax.
"""

from __future__ import annotations

from jaxlora.formats.hf import load_hf_checkpoint, param_shapes, save_hf_checkpoint
from jaxlora.formats.peft import (
    AdapterSpec,
    load_peft_adapter,
    read_peft_adapter_spec,
    save_peft_adapter,
)

__all__ = [
    "AdapterSpec",
    "load_hf_checkpoint",
    "load_peft_adapter",
    "param_shapes",
    "read_peft_adapter_spec",
    "restore_params",
    "save_hf_checkpoint",
    "save_params",
    "save_peft_adapter",
]


def __getattr__(name):
    if name in ("save_params", "restore_params"):
        from jaxlora.formats import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'jaxlora.formats' has no attribute {name!r}")

"""Test helpers: random base parameters and random PEFT adapter directories for small models.

These write the on-disk formats directly (safetensors + JSON, the way PEFT and transformers write
them) without going through jaxlora.formats, so the loaders are tested against independent files.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from jaxlora.config import ModelConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES


def peft_tensor_prefix(layer: int, module: str) -> str:
    """The name PEFT gives a Llama module's LoRA tensors, up to `.lora_A` / `.lora_B`."""
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}"


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """A random parameter tree of jaxlora.model.Llama (numpy float32, layers stacked on axis 0).

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers and LoRA
    deltas remain visible in the logits.
    """
    rng = np.random.default_rng(seed)
    n_layers, hidden = config.num_layers, config.hidden_size

    def dense(fan_in, fan_out, stacked=True):
        shape = (n_layers, fan_in, fan_out) if stacked else (fan_in, fan_out)
        return {"kernel": (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)}

    def norm(shape):
        return {"scale": (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)}

    shapes = config.module_shapes()
    params = {
        "embed_tokens": {
            "embedding": rng.standard_normal((config.vocab_size, hidden)).astype(np.float32)
        },
        "layers": {
            "input_layernorm": norm((n_layers, hidden)),
            "attn": {m: dense(*shapes[m]) for m in ATTENTION_MODULES},
            "post_attention_layernorm": norm((n_layers, hidden)),
            "mlp": {m: dense(*shapes[m]) for m in MLP_MODULES},
        },
        "norm": norm((hidden,)),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = dense(hidden, config.vocab_size, stacked=False)
    return params


def write_random_peft_adapter(
    directory,
    config: ModelConfig,
    *,
    rank: int,
    target_modules=ALL_MODULES,
    alpha: float | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    dtype: str = "float32",
) -> str:
    """Writes a valid PEFT LoRA directory with non-zero random A and B; returns its path.

    alpha defaults to 2 * rank (a common PEFT choice); every layer and every target module gets
    rank `rank`. target_modules is written to adapter_config.json as given (list or regex string).
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    modules = (
        [m for m in ALL_MODULES if m in target_modules]
        if not isinstance(target_modules, str)
        else list(ALL_MODULES)
    )
    shapes = config.module_shapes()
    tensors = {}
    for layer in range(config.num_layers):
        for module in modules:
            fan_in, fan_out = shapes[module]
            prefix = peft_tensor_prefix(layer, module)
            tensors[f"{prefix}.lora_A.weight"] = (
                rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)
            ).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (
                rng.standard_normal((fan_out, rank)) / np.sqrt(rank)
            ).astype(dtype)
    save_file(
        tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.name,
        "r": rank,
        "lora_alpha": float(2 * rank if alpha is None else alpha),
        "lora_dropout": 0.0,
        "target_modules": (
            target_modules if isinstance(target_modules, str) else list(target_modules)
        ),
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return directory

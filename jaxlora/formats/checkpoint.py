"""Converted base parameters saved and restored with orbax-checkpoint, the config as JSON beside.

Layout of a checkpoint directory: model_config.json (HF config.json fields) and
params/ (an orbax StandardCheckpointer checkpoint of the params pytree).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlora.config import ModelConfig
from jaxlora.errors import FormatError
from jaxlora.formats.hf import check_params, read_hf_config

# Not "config.json": a directory holding one is taken for a HF checkpoint (jaxlora.llm).
CONFIG_NAME = "model_config.json"
PARAMS_DIR = "params"


def save_params(
    path: str | os.PathLike,
    config: ModelConfig,
    params: dict,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Writes params (numpy or jax leaves) and the config; replaces an existing checkpoint.
    Fused projections (the engine's ``LLM.params``) are stored as the canonical tree.

    tokenizer_dir: a directory holding tokenizer.json (and optionally tokenizer_config.json),
    copied beside the params so that `jaxlora.LLM(path)` and the server can encode text.
    """
    from jaxlora.model import unfuse_projections

    directory = os.path.abspath(os.fspath(path))
    params = unfuse_projections(params)
    check_params(config, params, source="save_params: params")
    os.makedirs(directory, exist_ok=True)
    if tokenizer_dir is not None:
        source = os.fspath(tokenizer_dir)
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise FormatError(f"{source}: no tokenizer.json (save_params tokenizer_dir)")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump({**config.to_hf_dict(), "_name_or_path": config.name}, f, indent=2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
        checkpointer.wait_until_finished()


def restore_params(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Reads (config, params) written by save_params; params leaves are numpy arrays.

    The restore target (shapes and dtypes) comes from the stored config and orbax's metadata,
    so a checkpoint that does not match its config is refused instead of silently reshaped.
    """
    directory = os.path.abspath(os.fspath(path))
    config = read_hf_config(os.path.join(directory, CONFIG_NAME))
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FormatError(
            f"{params_dir}: not found (expected an orbax checkpoint written by save_params)"
        )
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(params_dir).item_metadata
        except Exception as e:  # orbax raises assorted types for unreadable metadata
            raise FormatError(
                f"{params_dir}: unreadable orbax checkpoint metadata ({type(e).__name__}: {e})"
            ) from e
        stored = _to_plain_dict(stored)
        check_params(config, stored, source=params_dir)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
            stored,
            is_leaf=lambda m: hasattr(m, "shape"),
        )
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as e:
            raise FormatError(
                f"{params_dir}: cannot restore params ({type(e).__name__}: {e})"
            ) from e
    return config, _to_plain_dict(params)


def _to_plain_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_plain_dict(v) for k, v in tree.items()}
    return tree if not isinstance(tree, np.generic) else np.asarray(tree)

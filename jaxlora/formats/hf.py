"""HF checkpoints (config.json + model.safetensors or a sharded index) <-> jaxlora params, for
the families ModelConfig reads (Llama, Mistral, Qwen2, Qwen3, Phi-3: Phi-3's fused qkv_proj and
gate_up_proj tensors are split into the modules' kernels here and fused again on export).

The params pytree is the one jaxlora.model.Llama takes under {"params": ...}: every linear is a
`kernel` (HF `weight` transposed, so activations multiply it from the left) and every per-layer
leaf is stacked over layers on axis 0 (the model scans over layers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from safetensors.numpy import save_file

from jaxlora.config import ModelConfig, is_finite_number, is_int, read_config_json
from jaxlora.errors import ConfigError, FormatError
from jaxlora.formats import _safetensors
from jaxlora.formats._safetensors import FLOAT_DTYPES

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
BIASED_MODULES = ("q_proj", "k_proj", "v_proj")  # Qwen2's (ModelConfig.qkv_bias)
QK_NORMS = ("q_norm", "k_norm")  # Qwen3's (ModelConfig.qk_norm)

# Buffers that some transformers versions saved although they are derived from the config.
_DERIVED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)

# Side of the tiles load_hf_checkpoint copies a transposed weight in. numpy copies a transposed
# view whole element by element, each destination row reading one element of every source row:
# a cache miss an element (bf16 0.27 GB/s, float32 0.14 GB/s on one core of the CPU machine),
# which made a 7B checkpoint's load ~60 s on the GPU machine; tile by tile both stay in cache
# (bf16 0.68 GB/s, float32 1.33 GB/s).
_TRANSPOSE_TILE = 256


GENERATION_CONFIG_FILE = "generation_config.json"


# generation_config.json field -> (the sampling default it sets, its check, what it expects).
# The numbers must be finite: an infinite default (JSON's Infinity) was taken, then refused by
# every request that left the field out, with an error that did not name the file.
GENERATION_DEFAULT_FIELDS = {
    "temperature": ("temperature", lambda v: is_finite_number(v) and v >= 0, "a number >= 0"),
    "top_p": ("top_p", lambda v: is_finite_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (
        "top_k",
        lambda v: is_int(v) and v >= -1,
        "an int >= 0 (0 or -1: off)",
    ),
    "min_p": ("min_p", lambda v: is_finite_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (
        "repetition_penalty",
        lambda v: is_finite_number(v) and v > 0,
        "a number > 0",
    ),
    "max_new_tokens": (
        "max_tokens",
        lambda v: is_int(v) and v >= 1,
        "an int >= 1",
    ),
}


def read_generation_defaults(path: str | os.PathLike) -> dict[str, float | int]:
    """The sampling defaults a HF model's generation_config.json sets (vLLM's
    ``--generation-config auto``): temperature, top_p, top_k, min_p, repetition_penalty and
    max_new_tokens (as max_tokens), those it holds; {} when there is no such file. ``path``: the
    model directory or the file itself. A field of the wrong type or range is a FormatError
    naming the file and the field."""
    path = os.fspath(path)
    file = os.path.join(path, GENERATION_CONFIG_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return {}
    from jaxlora.tokenizer import load_json_object

    config = load_json_object(file)
    defaults = {}
    for field, (name, check, expected) in GENERATION_DEFAULT_FIELDS.items():
        value = config.get(field)
        if value is None:
            continue
        if not check(value):
            raise FormatError(f"{file}: field {field!r}: expected {expected}, got {value!r}")
        defaults[name] = value
    return defaults


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a HF config.json, in the format of transformers 4 or 5
    (``ModelConfig.from_hf_dict``, which names the file and the field of a bad value)."""
    path, raw = read_config_json(path)
    quantization = raw.get("quantization_config")
    if quantization:
        # Its weights are packed integers or FP8 with scales (q_proj.qweight, weight_scale):
        # without this, the first refusal would be a "missing tensor q_proj.weight".
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConfigError(
            f"{path}: field 'quantization_config' is set (quant_method {method!r}): quantized "
            "checkpoints are not supported; expected an unquantized checkpoint (float32, "
            "float16 or bfloat16 weights). Some exports of merged 16-bit weights keep a stale "
            "quantization_config: if this checkpoint's weights are floats, delete the field"
        )
    return ModelConfig.from_hf_dict(raw, source=path)


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree of the model with shape tuples as leaves."""
    n, h, v = config.num_layers, config.hidden_size, config.vocab_size
    modules = config.module_shapes()
    attn = {m: {"kernel": (n, *modules[m])} for m in ATTENTION_MODULES}
    if config.qkv_bias:
        for m in BIASED_MODULES:
            attn[m]["bias"] = (n, modules[m][1])
    if config.qk_norm:
        for norm in QK_NORMS:
            attn[norm] = {"scale": (n, config.head_dim)}
    shapes = {
        "embed_tokens": {"embedding": (v, h)},
        "layers": {
            "input_layernorm": {"scale": (n, h)},
            "attn": attn,
            "post_attention_layernorm": {"scale": (n, h)},
            "mlp": {m: {"kernel": (n, *modules[m])} for m in MLP_MODULES},
        },
        "norm": {"scale": (h,)},
    }
    if config.sandwich_norms:
        for norm in ("attn_output_norm", "mlp_output_norm"):
            shapes["layers"][norm] = {"scale": (n, h)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (h, v)}
    return shapes


def _hf_norms(config: ModelConfig) -> tuple[tuple[str, str], ...]:
    """(HF name, params name) of each layer's RMSNorms. Gemma 2's post_attention_layernorm
    normalizes the attention's output; its pre_feedforward_layernorm is the MLP's input norm,
    which the params (Llama's naming) call post_attention_layernorm."""
    if config.sandwich_norms:
        return (
            ("input_layernorm", "input_layernorm"),
            ("post_attention_layernorm", "attn_output_norm"),
            ("pre_feedforward_layernorm", "post_attention_layernorm"),
            ("post_feedforward_layernorm", "mlp_output_norm"),
        )
    return (
        ("input_layernorm", "input_layernorm"),
        ("post_attention_layernorm", "post_attention_layernorm"),
    )


# Phi-3's checkpoint tensors that hold several modules' weights, their rows in this order.
FUSED_CHECKPOINT_TENSORS = {
    "self_attn.qkv_proj": ("attn", ("q_proj", "k_proj", "v_proj")),
    "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}


def _hf_fused_layout(config: ModelConfig) -> Iterator[tuple[str, tuple, int]]:
    """(HF tensor name, ((params path, output columns), ...), layer) of every tensor that holds
    several modules (ModelConfig.fused_checkpoint: Phi-3's qkv_proj, gate_up_proj), stored
    (out, in) with the modules' output rows one after another."""
    if not config.fused_checkpoint:
        return
    modules = config.module_shapes()
    for layer in range(config.num_layers):
        for tensor, (block, members) in FUSED_CHECKPOINT_TENSORS.items():
            parts = tuple((("layers", block, m, "kernel"), modules[m][1]) for m in members)
            yield f"model.layers.{layer}.{tensor}.weight", parts, layer


def _hf_layout(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, bool]]:
    """(HF tensor name, params path, layer index or None, stored transposed) for every tensor
    that holds one parameter (the fused ones: ``_hf_fused_layout``)."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), None, False
    yield "model.norm.weight", ("norm", "scale"), None, False
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), None, True
    fused = {m for _, members in FUSED_CHECKPOINT_TENSORS.values() for m in members}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        for hf_norm, norm in _hf_norms(config):
            yield f"{prefix}.{hf_norm}.weight", ("layers", norm, "scale"), layer, False
        for m in ATTENTION_MODULES:
            if config.fused_checkpoint and m in fused:
                continue
            yield f"{prefix}.self_attn.{m}.weight", ("layers", "attn", m, "kernel"), layer, True
        if config.qkv_bias:
            for m in BIASED_MODULES:
                yield f"{prefix}.self_attn.{m}.bias", ("layers", "attn", m, "bias"), layer, False
        if config.qk_norm:
            for norm in QK_NORMS:
                yield (
                    f"{prefix}.self_attn.{norm}.weight",
                    ("layers", "attn", norm, "scale"),
                    layer,
                    False,
                )
        for m in MLP_MODULES:
            if config.fused_checkpoint and m in fused:
                continue
            yield f"{prefix}.mlp.{m}.weight", ("layers", "mlp", m, "kernel"), layer, True


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(
    config: ModelConfig, path: tuple[str, ...], layer: int | None, transposed: bool
) -> tuple[int, ...]:
    shape = _leaf(param_shapes(config), path)
    if layer is not None:
        shape = shape[1:]
    return tuple(reversed(shape)) if transposed else tuple(shape)


def param_tree_mismatch(config: ModelConfig, params) -> str | None:
    """The first parameter of ``params`` (a dict tree) that the model of ``config`` lacks, does
    not have, or has in another shape, as a message naming it by its path
    (``params['layers']['attn']['q_proj']['kernel']``); None where the tree is the model's.
    The canonical tree and the fused one (q|k|v, gate|up: the engine's ``LLM.params``) are both
    the model's. The expected shapes are ``param_shapes``' (no trace of the model's init)."""
    import jax

    from jaxlora.model import fuse_projections, projections_fused

    def is_shape(leaf) -> bool:
        return isinstance(leaf, tuple)

    expected = param_shapes(config)
    qkv = params["layers"]["attn"]["qkv_proj"] if projections_fused(params) else None
    if isinstance(qkv, dict) and len(getattr(qkv.get("kernel"), "shape", ())) > 2:
        groups = qkv["kernel"].shape[-2]  # (the tensor-parallel groups it was fused for)
        structs = jax.tree.map(
            lambda shape: jax.ShapeDtypeStruct(shape, np.float32), expected, is_leaf=is_shape
        )
        fused = jax.eval_shape(lambda tree: fuse_projections(tree, groups=groups), structs)
        expected = jax.tree.map(lambda leaf: tuple(leaf.shape), fused)

    def by_path(tree, shape_of, is_leaf=None) -> dict[str, tuple | None]:
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
        return {f"params{jax.tree_util.keystr(path)}": shape_of(leaf) for path, leaf in leaves}

    given = by_path(params, lambda leaf: tuple(leaf.shape) if hasattr(leaf, "shape") else None)
    wanted = by_path(expected, tuple, is_leaf=is_shape)
    model = f"the {config.name or config.model_type} model of this ModelConfig"
    tied = f"tie_word_embeddings={config.tie_word_embeddings}"
    for path, shape in wanted.items():
        if path not in given:
            return f"{path}: missing; {model} has it, of shape {shape}"
        if given[path] is None:
            return f"{path}: expected an array of shape {shape}, got no array"
        if given[path] != shape:
            return f"{path} has shape {given[path]}; expected {shape} ({model})"
    for path in given:
        if path not in wanted:
            hint = f" ({tied}: the LM head is the embedding's)" if "lm_head" in path else ""
            return f"{path}: not a parameter of {model}{hint}"
    return None


def check_params(config: ModelConfig, params, source: str = "params") -> None:
    """FormatError (naming ``source``, a file or what is being written) unless params is the
    model's tree (``param_tree_mismatch``): the check before a checkpoint is read or written."""
    if not isinstance(params, dict):
        raise FormatError(
            f"{source}: expected a dict pytree of arrays, got {type(params).__name__}"
        )
    mismatch = param_tree_mismatch(config, params)
    if mismatch is not None:
        raise FormatError(f"{source}: {mismatch}")


def _weight_files(directory: str) -> tuple[dict[str, str], dict, str]:
    """(tensor name -> safetensors file holding it, file -> its header's tensors, the file that
    lists the tensors: model.safetensors itself or the index, for messages about missing ones)."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):
        tensors, _ = _safetensors.read_header(single)
        return dict.fromkeys(tensors, single), {single: tensors}, single
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(
                f"{index}: not a valid safetensors index (expected JSON with a "
                f"'weight_map' object): {e}"
            ) from e
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index}: field 'weight_map' must map tensor names to file names")
        files = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise FormatError(
                    f"{index}: weight_map[{name!r}] = {shard!r}; expected a file "
                    "name in the checkpoint directory"
                )
            files[name] = os.path.join(directory, shard)
        for path in sorted(set(files.values())):
            if not os.path.isfile(path):
                listed = [name for name, file in files.items() if file == path]
                raise FormatError(
                    f"{index}: weight_map names shard {os.path.basename(path)!r} (for "
                    f"{len(listed)} tensors, e.g. {listed[0]!r}), but {path} is not found; "
                    "expected every shard the index names in the checkpoint directory"
                )
        headers = {path: _safetensors.read_header(path)[0] for path in sorted(set(files.values()))}
        holder: dict[str, str] = {}
        for path, tensors in headers.items():
            for name in tensors:
                if name in holder:
                    # transformers and vLLM read every shard whole: which copy they would serve
                    # depends on the order they read the shards in.
                    raise FormatError(
                        f"{index}: tensor {name!r} is in two shards, {holder[name]} and {path}; "
                        "expected each tensor in one shard"
                    )
                holder[name] = path
        for name, path in files.items():
            if name not in headers[path]:
                raise FormatError(
                    f"{path}: tensor {name!r} listed in {INDEX_NAME} is missing from this shard"
                )
        return files, headers, index
    pickled = _safetensors.find_pickle_beside(directory, ("pytorch_model", "model", "consolidated"))
    if pickled:
        _safetensors.refuse_pickle(pickled, "the checkpoint")
    raise FormatError(
        f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} (expected a HF checkpoint "
        "directory with safetensors weights)"
    )


def load_hf_checkpoint(
    path: str | os.PathLike, *, dtype=np.float32, workers: int | None = None
) -> tuple[ModelConfig, dict]:
    """Reads a HF Llama checkpoint directory into (config, params) with numpy leaves of dtype.

    Every tensor's presence, dtype and shape is checked from the safetensors headers before any
    weight is read; every weight must be finite once converted to dtype (as an adapter's must:
    NaN in the file, or a value the cast overflows, is a FormatError naming the tensor).
    ``workers`` tensors are read and converted at once (threads: the reads, copies and casts
    release the GIL; None: up to 8, one a CPU), each holding its tensor as read until placed.
    """
    directory = os.fspath(path)
    if os.path.isfile(directory):
        if directory.endswith(_safetensors.PICKLE_SUFFIXES):
            _safetensors.refuse_pickle(directory, "the checkpoint")
        raise FormatError(
            f"{directory}: expected a checkpoint directory (config.json + "
            f"{WEIGHTS_NAME}), got a file"
        )
    config = read_hf_config(os.path.join(directory, CONFIG_NAME))
    files, headers, listing = _weight_files(directory)
    layout = _checkpoint_entries(config)
    expected_names = {name for name, *_ in layout}
    for name, shape, *_ in layout:
        if name not in files:
            raise FormatError(f"{listing}: missing tensor {name!r} (expected shape {list(shape)})")
        info = headers[files[name]][name]
        if info.shape != shape:
            raise FormatError(
                f"{files[name]}: tensor {name!r} has shape {list(info.shape)}; "
                f"expected {list(shape)} (from {CONFIG_NAME})"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise FormatError(
                f"{files[name]}: tensor {name!r} has dtype {info.dtype}; expected "
                f"one of {sorted(FLOAT_DTYPES)}"
            )
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for name, file in sorted(files.items()):
        if name in expected_names or name in tolerated or name.endswith(_DERIVED_TENSOR_SUFFIXES):
            continue
        raise FormatError(
            f"{file}: unexpected tensor {name!r} (not part of a {config.model_type} model with "
            f"{config.num_layers} layers, tie_word_embeddings="
            f"{config.tie_word_embeddings})"
        )

    dtype = np.dtype(dtype)
    params = _map_shapes(param_shapes(config), lambda shape: np.empty(shape, dtype))

    def place(entry) -> None:
        """Reads one tensor and writes it into its (disjoint) place in params."""
        name, _, layer, transposed, parts = entry
        file = files[name]
        value = _safetensors.read_tensors(file, [name])[name]
        if transposed:
            value = value.T
        if config.hf_norm_offset and _is_norm(parts):
            value = value.astype(np.float32) + config.hf_norm_offset
        lo = 0
        for tensor_path, columns in parts:  # a fused tensor's modules, column by column
            part = value if columns is None else value[:, lo : lo + columns]
            lo += columns or 0
            target = _leaf(params, tensor_path)
            destination = target if layer is None else target[layer]
            with np.errstate(over="ignore"):  # (an overflow is refused just below)
                _copy_tiled(destination, part)
            # As an adapter's: NaN or inf in the file, or a weight the cast to dtype made
            # infinite, would be served as NaN logits wherever it is read.
            _safetensors.check_finite(file, name, part, destination)

    # Peak host memory: the converted params and the tensors of the workers in flight.
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="hf-load")
    try:
        for future in [pool.submit(place, entry) for entry in layout]:
            future.result()  # (the first failure in layout order, the others not waited for)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if "lm_head.weight" in tolerated and "lm_head.weight" in files:
        _check_tied_head(files["lm_head.weight"], params["embed_tokens"]["embedding"])
    return config, params


def _copy_tiled(destination: np.ndarray, source: np.ndarray) -> np.ndarray:
    """destination[...] = source; a 2-D source that is not C-contiguous (a transposed weight,
    or a fused one's columns) tile by tile (_TRANSPOSE_TILE). Returns destination."""
    if source.ndim != 2 or source.flags.c_contiguous:
        destination[...] = source
        return destination
    rows, cols = source.shape
    for i in range(0, rows, _TRANSPOSE_TILE):
        for j in range(0, cols, _TRANSPOSE_TILE):
            tile = (slice(i, i + _TRANSPOSE_TILE), slice(j, j + _TRANSPOSE_TILE))
            destination[tile] = source[tile]
    return destination


def _check_tied_head(file: str, embedding: np.ndarray) -> None:
    """A checkpoint whose config ties the LM head to the embeddings may still hold an
    lm_head.weight: the embeddings' copy is ignored, another head is refused (transformers 5
    would serve that head, untied; tying it would answer with other logits, silently)."""
    head = _safetensors.read_tensors(file, ["lm_head.weight"])["lm_head.weight"]
    if not np.array_equal(head.astype(embedding.dtype), embedding):
        raise FormatError(
            f"{file}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' while "
            f"{CONFIG_NAME} sets tie_word_embeddings true: expected no lm_head.weight or a copy "
            f"of the embeddings (set tie_word_embeddings false in {CONFIG_NAME} to serve this "
            "head)"
        )


def _is_norm(parts) -> bool:
    """A checkpoint tensor holding an RMSNorm's weight (its params leaf is a "scale")."""
    return parts[0][0][-1] == "scale"


def _checkpoint_entries(config: ModelConfig) -> list[tuple]:
    """(HF tensor name, its shape, layer or None, stored transposed, ((params path, columns or
    None), ...)) of every tensor of the checkpoint: a fused one (Phi-3's) names each module's
    kernel with its output columns, in order."""
    entries = [
        (name, _hf_shape(config, path, layer, transposed), layer, transposed, ((path, None),))
        for name, path, layer, transposed in _hf_layout(config)
    ]
    for name, parts, layer in _hf_fused_layout(config):
        shape = (sum(columns for _, columns in parts), config.hidden_size)
        entries.append((name, shape, layer, True, parts))
    return entries


def _map_shapes(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_shapes(v, fn) for k, v in tree.items()}
    return fn(tree)


def _torch_dtype_name(dtype: np.dtype) -> str:
    return {
        "float32": "float32",
        "float16": "float16",
        "bfloat16": "bfloat16",
        "float64": "float64",
    }.get(np.dtype(dtype).name, "float32")


def save_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, params: dict) -> None:
    """Writes config.json and model.safetensors that transformers loads (the model type's
    class: LlamaForCausalLM, Qwen2ForCausalLM, ...).

    params: the canonical tree, or the engine's fused projections (split back here)."""
    from jaxlora.model import unfuse_projections

    directory = os.fspath(path)
    params = unfuse_projections(params)
    check_params(config, params)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, _, layer, transposed, parts in _checkpoint_entries(config):
        values = []
        for tensor_path, _ in parts:
            value = np.asarray(_leaf(params, tensor_path))
            values.append(value if layer is None else value[layer])
        value = values[0] if len(values) == 1 else np.concatenate(values, axis=-1)
        if config.hf_norm_offset and _is_norm(parts):
            value = (value.astype(np.float32) - config.hf_norm_offset).astype(value.dtype)
        value = value.T if transposed else value
        if not value.flags.c_contiguous:
            value = _copy_tiled(np.empty(value.shape, value.dtype), value)
        tensors[name] = value
    dtype = np.asarray(params["embed_tokens"]["embedding"]).dtype
    hf_config = {
        **config.to_hf_dict(),
        "_name_or_path": config.name,
        "torch_dtype": _torch_dtype_name(dtype),
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) <-> jaxlora LoraWeights.

Which modules an adapter touches, and with which rank and alpha, is decided exactly as PEFT
decides it when it loads the adapter (`check_target_module_exists`, `get_pattern_key`): the config's
`target_modules` (names matched as suffixes, a regex matched against the full module name, or
"all-linear"), `exclude_modules`, `layers_to_transform` / `layers_pattern`, `rank_pattern` and
`alpha_pattern`. The tensors must then be exactly the ones these settings imply.

Errors: AdapterError for adapters that are valid PEFT but use something jaxlora does not serve
(DoRA, modules_to_save, bias, embedding / lm_head LoRA, rank above the pool's maximum); FormatError
for files that are malformed or do not match the base model (bad JSON, unknown module, missing,
unexpected or wrongly shaped tensor, NaN or infinite weights, pickle, truncated file).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re

import numpy as np
from safetensors.numpy import save_file

from jaxlora.config import ModelConfig, is_finite_number, is_positive_int
from jaxlora.errors import AdapterError, FormatError
from jaxlora.formats import _safetensors
from jaxlora.formats._safetensors import FLOAT_DTYPES
from jaxlora.formats.hub_cache import is_repo_id, not_cached, resolve_local
from jaxlora.lora import LoraWeights
from pallas_kernels.layout import MODULES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
TENSOR_PREFIX = "base_model.model."
# PEFT's default target_modules for Llama / Mistral when the config gives none.
DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"

# Config fields that switch on a feature changing the forward pass, which jaxlora does not serve;
# an adapter is refused when any of them is set to something truthy (bias: anything but "none").
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "modules_to_save (fully fine-tuned modules)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices (embedding updates)",
    "target_parameters": "target_parameters (LoRA on parameters, not modules)",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights methods that rewrite the base weights (W - A B, quantisation): such an adapter
# only works with its own modified base model, unless PEFT converted it at save time (which
# resets init_lora_weights to true).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Every adapter_config.json field of PEFT's LoraConfig that jaxlora has judged; an unknown field
# that looks like a feature switch (use_*, *_config) and is set is refused rather than ignored.
KNOWN_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "trainable_token_indices",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "use_dora",
        "velora_config",
        "alora_invocation_tokens",
        "use_qalora",
        "qalora_group_size",
        "monteclora_config",
        "layer_replication",
        "runtime_config",
        "lora_bias",
        "target_parameters",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
        "ensure_weight_tying",
    }
)

# Modules whose whole weight PEFT saves with the adapter (modules_to_save, resized embeddings).
FULL_WEIGHT_MODULES = ("lm_head", "model.embed_tokens", "embed_tokens")

_TENSOR_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$"
)


# Phi-3's fused linears (ModelConfig.fused_checkpoint), which its adapters target: each holds
# its members' output rows in order, and a LoRA on it is one on each member with the same A and
# that member's rows of B.
FUSED_PEFT_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def peft_modules(config: ModelConfig) -> tuple[str, ...]:
    """The LoRA-able linears of the base model as PEFT sees them: the seven of MODULES, or
    Phi-3's qkv_proj, o_proj, gate_up_proj and down_proj."""
    if config.fused_checkpoint:
        return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    return MODULES


def _peft_module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every module of peft_modules(config)."""
    shapes = config.module_shapes()
    out = {}
    for module in peft_modules(config):
        members = FUSED_PEFT_MODULES.get(module, (module,))
        out[module] = (shapes[members[0]][0], sum(shapes[m][1] for m in members))
    return out


def _in_attention(module: str) -> bool:
    return module in ATTENTION_MODULES or module == "qkv_proj"


def _module_key(layer: int, module: str) -> str:
    """The module's name in transformers' *ForCausalLM (what PEFT matches patterns against)."""
    block = "self_attn" if _in_attention(module) else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


@functools.lru_cache(maxsize=8)
def _model_module_names(config: ModelConfig) -> tuple[str, ...]:
    """Every named module of transformers' *ForCausalLM except the root, in its order."""
    modules = peft_modules(config)
    attention = [m for m in modules if _in_attention(m)]
    mlp = [m for m in modules if not _in_attention(m)]
    if config.fused_checkpoint:  # Phi3Attention defines o_proj before qkv_proj
        attention = sorted(attention, key=lambda m: m != "o_proj")
    names = ["model", "model.embed_tokens", "model.layers"]
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        names += [prefix, f"{prefix}.self_attn"]
        names += [_module_key(layer, m) for m in attention]
        names += [f"{prefix}.mlp"] + [_module_key(layer, m) for m in mlp]
        names += [
            f"{prefix}.mlp.activation_fn" if config.fused_checkpoint else f"{prefix}.mlp.act_fn",
            f"{prefix}.input_layernorm",
            f"{prefix}.post_attention_layernorm",
        ]
        if config.sandwich_norms:
            names += [f"{prefix}.pre_feedforward_layernorm", f"{prefix}.post_feedforward_layernorm"]
        if config.fused_checkpoint:
            names += [f"{prefix}.resid_attn_dropout", f"{prefix}.resid_mlp_dropout"]
    return (*names, "model.norm", "model.rotary_emb", "lm_head")


@functools.lru_cache(maxsize=8)
def _module_name_suffixes(config: ModelConfig) -> frozenset[str]:
    """Every module name and every dot-separated tail of one: what a target_modules entry may
    name (PEFT matches list entries as `name == entry or name.endswith("." + entry)`)."""
    tails = set()
    for name in _model_module_names(config):
        parts = name.split(".")
        tails.update(".".join(parts[i:]) for i in range(len(parts)))
    return frozenset(tails)


@functools.lru_cache(maxsize=8)
def _targetable(config: ModelConfig) -> dict[str, tuple[int, str]]:
    """Module name -> (layer, module) for the LoRA-able linears of every layer
    (peft_modules)."""
    return {
        _module_key(layer, m): (layer, m)
        for layer in range(config.num_layers)
        for m in peft_modules(config)
    }


def _matches_target(targets, layers, layers_pattern, key: str) -> bool:
    """PEFT's check_target_module_exists for one module name (exclusions already applied)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    parts = key.split(".")
    # Equivalent to PEFT's any(key.endswith("." + t) for t in targets), without the scan over
    # targets (saved "all-linear" adapters list every module by its full name).
    if not any(".".join(parts[i:]) in targets for i in range(1, len(parts))):
        return False
    if layers is None or layers == ():
        return True
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(_layers_regex(pattern), key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _layers_regex(layers_pattern: str) -> str:
    """PEFT's regex of a module name in a layer of ``layers_pattern`` (its index: ``idx``)."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _excluded(exclude, key: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{e}") for e in exclude)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=256)
def _matched_modules(
    config: ModelConfig, targets, exclude, layers, layers_pattern
) -> tuple[str, ...]:
    """Names of the modules PEFT would put LoRA on. Cached: adapters of one fleet usually share
    their targeting settings, and registering thousands of adapters must take seconds."""
    return tuple(
        key
        for key in _model_module_names(config)
        if not _excluded(exclude, key) and _matches_target(targets, layers, layers_pattern, key)
    )


def _pattern_regex(pattern: str) -> str:
    """The regex PEFT's get_pattern_key matches a rank_pattern / alpha_pattern key with: the
    key at the end of the module name."""
    return rf"(.*\.)?({pattern})$"


def _pattern_key(patterns: dict, key: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name."""
    for pattern in patterns:
        if re.match(_pattern_regex(pattern), key):
            return pattern
    return None


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What registering an adapter needs to know, read from its config and safetensors header.

    ranks / scales: per targeted module, the rank-rows the adapter takes (max over layers) and the
    scale the kernels apply; layer_ranks / layer_scales: per layer (0 where a layer is untouched);
    tensors: per module and layer, the (lora_A, lora_B) tensor names (None where untouched),
    with (first, end) of the module's rows in lora_B where the tensors are a fused module's
    (Phi-3's qkv_proj, gate_up_proj);
    nbytes: bytes of the converted weights (A and B rank-rows, all layers) in `dtype`.
    """

    path: str
    name: str
    weights_file: str
    target_modules: tuple[str, ...]
    ranks: dict[str, int]
    scales: dict[str, float]
    layer_ranks: dict[str, tuple[int, ...]]
    layer_scales: dict[str, tuple[float, ...]]
    tensors: dict[str, tuple[tuple | None, ...]]
    use_rslora: bool
    dtype: str
    nbytes: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


def _adapter_paths(path: str) -> tuple[str, str, str]:
    given = os.fspath(path)
    directory = resolve_local(given)  # a Hub id: its snapshot in the local cache
    if os.path.isfile(directory):
        if directory.endswith(_safetensors.PICKLE_SUFFIXES):
            _safetensors.refuse_pickle(directory, "the adapter")
        raise FormatError(
            f"{directory}: expected an adapter directory ({CONFIG_NAME} + "
            f"{WEIGHTS_NAME}), got a file"
        )
    if not os.path.isdir(directory):
        hub = f"; as a Hugging Face id, {not_cached(given)}" if is_repo_id(given) else ""
        raise FormatError(f"{directory}: adapter directory not found{hub}")
    config_file = os.path.join(directory, CONFIG_NAME)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise FormatError(f"{config_file}: file not found (expected a PEFT adapter_config.json)")
    if not os.path.isfile(weights_file):
        pickled = _safetensors.find_pickle_beside(directory, ("adapter_model",))
        if pickled:
            _safetensors.refuse_pickle(pickled, "the adapter weights file")
        raise FormatError(
            f"{weights_file}: file not found (expected the adapter's safetensors weights)"
        )
    return directory, config_file, weights_file


def _read_config(config_file: str) -> dict:
    try:
        with open(config_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{config_file}: expected a JSON object")
    return cfg


def _check_config(cfg: dict, config_file: str) -> dict:
    """Validates field types and refuses unsupported features; returns a normalised copy."""
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{config_file}: field 'peft_type' is {peft_type!r}; expected 'LORA'")
    for field, feature in UNSUPPORTED_FEATURES.items():
        if cfg.get(field):
            raise AdapterError(
                f"{config_file}: field {field!r} is {cfg[field]!r}: {feature} is "
                "not supported; expected it unset (null/false)"
            )
    for field, value in cfg.items():
        looks_like_feature = field.startswith("use_") or field.endswith("_config")
        if field not in KNOWN_FIELDS and value and looks_like_feature:
            raise AdapterError(
                f"{config_file}: field {field!r} is {value!r}: an unknown PEFT "
                "feature, not supported; expected it unset (null/false)"
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{config_file}: field 'init_lora_weights' is {init!r}: this "
            "initialisation modifies the base weights, so the adapter only works "
            "with its own base model; expected an adapter converted at save time "
            "(init_lora_weights true)"
        )
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(
            f"{config_file}: field 'bias' is {bias!r}: adapters with biases are "
            "not supported; expected 'none'"
        )
    r = cfg.get("r")
    if not is_positive_int(r):
        raise FormatError(f"{config_file}: field 'r' is {r!r}; expected a positive int")
    alpha = cfg.get("lora_alpha", 8)
    if not is_finite_number(alpha):
        raise FormatError(
            f"{config_file}: field 'lora_alpha' is {alpha!r}; expected a finite number"
        )
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise FormatError(f"{config_file}: field 'use_rslora' is {use_rslora!r}; expected a bool")
    for field, valid, expected in (
        ("rank_pattern", is_positive_int, "a positive int"),
        ("alpha_pattern", is_finite_number, "a finite number"),
    ):
        patterns = cfg.get(field) or {}
        if not isinstance(patterns, dict):
            raise FormatError(
                f"{config_file}: field {field!r} must be an object mapping module "
                f"name patterns to values, got {patterns!r}"
            )
        for key, value in patterns.items():
            if not valid(value):
                raise FormatError(
                    f"{config_file}: {field}[{key!r}] is {value!r}; expected {expected}"
                )
            try:
                # As PEFT matches it: a key valid alone may not be inside that regex ("(?i)x":
                # inline flags must start the expression).
                re.compile(_pattern_regex(key))
            except re.error as e:
                raise FormatError(
                    f"{config_file}: {field} key {key!r} is not a valid regex ({e})"
                ) from e
    targets = cfg.get("target_modules")
    if targets is None:
        targets = frozenset(DEFAULT_TARGETS)
    elif isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            targets = None  # expanded against the model below
        else:
            try:
                re.compile(targets)
            except re.error as e:
                raise FormatError(
                    f"{config_file}: field 'target_modules' {targets!r} is not a valid regex ({e})"
                ) from e
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = frozenset(targets)
    else:
        raise FormatError(
            f"{config_file}: field 'target_modules' is {targets!r}; expected a list "
            "of module names, a regex string or 'all-linear'"
        )
    for field in ("exclude_modules", "layers_pattern"):
        value = cfg.get(field)
        if not (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise FormatError(
                f"{config_file}: field {field!r} is {value!r}; expected a string, "
                "a list of strings or null"
            )
        # (a string exclude_modules is a regex; each layers_pattern is one inside a regex)
        if field == "exclude_modules":
            patterns = [value] if isinstance(value, str) else []
        else:
            names = [] if value is None else [value] if isinstance(value, str) else value
            patterns = [_layers_regex(name) for name in names]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise FormatError(
                    f"{config_file}: field {field!r} {value!r} is not a valid regex ({e})"
                ) from e
    layers = cfg.get("layers_to_transform")
    if not (
        layers is None
        or (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise FormatError(
            f"{config_file}: field 'layers_to_transform' is {layers!r}; expected "
            "an int, a list of ints or null"
        )
    return {
        **cfg,
        "target_modules": targets,
        "target_modules_as_written": cfg.get("target_modules"),
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
    }


def _resolve_targets(cfg: dict, config: ModelConfig, config_file: str) -> dict[str, tuple]:
    """Module name -> (layer, module) of every module the adapter puts LoRA on, as PEFT would."""
    targetable = _targetable(config)
    if cfg["target_modules"] is None:  # all-linear: every linear but the output head, exactly
        cfg["target_modules"] = frozenset(targetable)
    exclude = cfg.get("exclude_modules")
    matched = _matched_modules(
        config,
        cfg["target_modules"],
        frozenset(exclude) if isinstance(exclude, list) else exclude,
        _hashable(cfg.get("layers_to_transform")),
        _hashable(cfg.get("layers_pattern")),
    )
    allowed = ", ".join(peft_modules(config))
    for key in matched:
        if key in ("model.embed_tokens", "lm_head"):
            raise AdapterError(
                f"{config_file}: field 'target_modules' selects {key!r}: LoRA on "
                f"embeddings / lm_head is not supported; expected only {allowed}"
            )
        if key not in targetable:
            raise AdapterError(
                f"{config_file}: field 'target_modules' selects module {key!r}, "
                f"which is not a LoRA-able linear; expected only {allowed}"
            )
    targets = cfg["target_modules"]
    if isinstance(targets, frozenset):
        for target in sorted(targets - _module_name_suffixes(config)):
            raise FormatError(
                f"{config_file}: target_modules entry {target!r} names no module "
                f"of the base model; expected one of {allowed} (or a full "
                "module name)"
            )
    if not matched:
        raise FormatError(
            f"{config_file}: field 'target_modules' "
            f"({cfg['target_modules_as_written']!r}) selects no module "
            f"of the base model ({config.num_layers} layers); expected {allowed}"
        )
    return {key: targetable[key] for key in matched}


def _parse_tensor_name(
    name: str, weights_file: str, targetable: dict, allowed: tuple[str, ...] = MODULES
) -> tuple[str, str]:
    """(module name, 'lora_A' | 'lora_B') of a PEFT tensor name, or a clear error."""
    supported = f"{TENSOR_PREFIX}model.layers.<i>.<self_attn|mlp>.<module>.<lora_A|lora_B>.weight"
    if "lora_magnitude_vector" in name:
        raise AdapterError(
            f"{weights_file}: tensor {name!r} is a DoRA magnitude vector; DoRA is not supported"
        )
    if "lora_embedding_" in name or "trainable_tokens" in name:
        raise AdapterError(
            f"{weights_file}: tensor {name!r} is an embedding update; LoRA on "
            "embeddings is not supported"
        )
    if "modules_to_save" in name:
        raise AdapterError(
            f"{weights_file}: tensor {name!r} belongs to modules_to_save; fully "
            "fine-tuned modules are not supported"
        )
    if name.endswith(".bias"):
        raise AdapterError(
            f"{weights_file}: tensor {name!r} is a bias; adapters with biases are not supported"
        )
    match = _TENSOR_RE.match(name[len(TENSOR_PREFIX) :]) if name.startswith(TENSOR_PREFIX) else None
    if match is None:
        if name.removeprefix(TENSOR_PREFIX).removesuffix(".weight") in FULL_WEIGHT_MODULES:
            raise AdapterError(
                f"{weights_file}: tensor {name!r} is a full module weight "
                "(modules_to_save or saved embedding layers); not supported"
            )
        raise FormatError(
            f"{weights_file}: unknown tensor {name!r}; expected names like {supported}"
        )
    module = match.group("module")
    if module not in targetable and f"model.{module}" in targetable:
        module = f"model.{module}"  # saved from a bare LlamaModel rather than LlamaForCausalLM
    if module not in targetable:
        layer = re.match(r"model\.layers\.(\d+)\.", module)
        n_layers = 1 + max(layer for layer, _ in targetable.values())
        if layer and int(layer.group(1)) >= n_layers:
            raise FormatError(
                f"{weights_file}: tensor {name!r} is for layer {layer.group(1)}, "
                f"but the base model has {n_layers} layers (expected layer indices "
                f"0..{n_layers - 1}): the adapter belongs to another model"
            )
        if module.endswith(("embed_tokens", "lm_head")):
            raise AdapterError(
                f"{weights_file}: tensor {name!r} is LoRA on {module!r}; LoRA on "
                "embeddings / lm_head is not supported"
            )
        raise FormatError(
            f"{weights_file}: tensor {name!r} targets module {module!r}, which is "
            f"not a LoRA-able linear of the base model; expected names like "
            f"{supported} with <module> in {', '.join(allowed)}"
        )
    return module, match.group("kind")


# The largest scale the kernels' float32 scale tables hold.
_LARGEST_SCALE = float(np.finfo(np.float32).max)


def _module_scale(layer_ranks: list[int], layer_scales: list[float]) -> float:
    """The scale the kernels apply to a module: that of its first full-rank layer (other layers
    fold their ratio to it into their B rows), or any non-zero one if that one is zero."""
    top = max(layer_ranks)
    full = [s for r, s in zip(layer_ranks, layer_scales, strict=True) if r == top and s]
    return (full or [s for s in layer_scales if s] or [0.0])[0]


def read_peft_adapter_spec(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    max_rank: int,
    name: str | None = None,
    dtype=np.float32,
) -> AdapterSpec:
    """Validates a PEFT adapter against the base model without reading its weights."""
    directory, config_file, weights_file = _adapter_paths(path)
    raw_config = _read_config(config_file)
    cfg = _check_config(raw_config, config_file)
    if config.fused_checkpoint and raw_config.get("target_modules") is None:
        raise FormatError(
            f"{config_file}: field 'target_modules' is missing; PEFT has no default for "
            f"{config.model_type} models: expected a list of {', '.join(peft_modules(config))}"
        )
    selected = _resolve_targets(cfg, config, config_file)
    n_layers = config.num_layers
    layer_ranks = {}
    layer_scales = {}
    for key, (layer, module) in selected.items():
        rank_key = _pattern_key(cfg["rank_pattern"], key)
        alpha_key = _pattern_key(cfg["alpha_pattern"], key)
        rank = cfg["rank_pattern"][rank_key] if rank_key is not None else cfg["r"]
        alpha = cfg["alpha_pattern"][alpha_key] if alpha_key is not None else cfg["lora_alpha"]
        if rank > max_rank:
            field = f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r"
            raise AdapterError(
                f"{config_file}: field {field} gives module {key!r} rank {rank}; "
                f"expected at most max_rank={max_rank}"
            )
        scale = alpha / math.sqrt(rank) if cfg["use_rslora"] else alpha / rank
        if abs(scale) > _LARGEST_SCALE:
            # (finite in float64, infinite in the kernels' float32 scales: every output of the
            # adapter would be inf or NaN)
            field = f"alpha_pattern[{alpha_key!r}]" if alpha_key is not None else "lora_alpha"
            raise FormatError(
                f"{config_file}: field {field} is {alpha!r}, which gives module {key!r} (rank "
                f"{rank}) the scale {scale:.3g}; expected a scale within float32's range "
                f"(at most {_LARGEST_SCALE:.3g} in magnitude)"
            )
        layer_ranks.setdefault(module, [0] * n_layers)[layer] = rank
        layer_scales.setdefault(module, [0.0] * n_layers)[layer] = scale

    header, _ = _safetensors.read_header(weights_file)
    targetable = _targetable(config)
    found: dict[tuple[str, str], str] = {}
    for tensor in header:
        key, kind = _parse_tensor_name(tensor, weights_file, targetable, peft_modules(config))
        if key not in selected:
            written = cfg["target_modules_as_written"]
            raise FormatError(
                f"{weights_file}: unexpected tensor {tensor!r}: module {key!r} is "
                f"not selected by target_modules={written!r} in {CONFIG_NAME}"
            )
        if (key, kind) in found:
            raise FormatError(
                f"{weights_file}: tensors {found[key, kind]!r} and {tensor!r} are "
                "both the same LoRA factor (one adapter per file expected)"
            )
        found[key, kind] = tensor

    shapes = _peft_module_shapes(config)
    tensors = {m: [None] * n_layers for m in layer_ranks}
    for key, (layer, module) in selected.items():
        rank = layer_ranks[module][layer]
        fan_in, fan_out = shapes[module]
        names = []
        for kind, expected in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
            tensor = found.get((key, kind))
            if tensor is None:
                raise FormatError(
                    f"{weights_file}: missing tensor "
                    f"'{TENSOR_PREFIX}{key}.{kind}.weight' (expected shape "
                    f"{list(expected)}; module selected by {CONFIG_NAME})"
                )
            info = header[tensor]
            if info.shape != expected:
                raise FormatError(
                    f"{weights_file}: tensor {tensor!r} has shape "
                    f"{list(info.shape)}; expected {list(expected)} (rank {rank}, "
                    f"{module} is {fan_in} -> {fan_out})"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise FormatError(
                    f"{weights_file}: tensor {tensor!r} has dtype {info.dtype}; "
                    f"expected one of {sorted(FLOAT_DTYPES)}"
                )
            names.append(tensor)
        tensors[module][layer] = (names[0], names[1])

    # A fused module (Phi-3's) is a LoRA on each member: its rank and scale, its A, and the
    # member's rows of its B (the last two entries of the member's tensors).
    model_shapes = config.module_shapes()
    for fused, members in FUSED_PEFT_MODULES.items():
        if fused not in layer_ranks:
            continue
        ranks_of, scales_of, pairs = (
            layer_ranks.pop(fused),
            layer_scales.pop(fused),
            tensors.pop(fused),
        )
        lo = 0
        for m in members:
            width = model_shapes[m][1]
            layer_ranks[m], layer_scales[m] = list(ranks_of), list(scales_of)
            tensors[m] = [None if p is None else (*p, lo, lo + width) for p in pairs]
            lo += width
    target_modules = tuple(m for m in MODULES if m in layer_ranks)
    ranks = {m: max(layer_ranks[m]) for m in target_modules}
    scales = {m: _module_scale(layer_ranks[m], layer_scales[m]) for m in target_modules}
    itemsize = np.dtype(dtype).itemsize
    nbytes = sum(n_layers * ranks[m] * sum(model_shapes[m]) * itemsize for m in target_modules)
    return AdapterSpec(
        path=directory,
        # (named after the path given: a Hub id's snapshot directory is a commit hash)
        name=name or os.path.basename(os.path.normpath(os.fspath(path))),
        weights_file=weights_file,
        target_modules=target_modules,
        ranks=ranks,
        scales=scales,
        layer_ranks={m: tuple(layer_ranks[m]) for m in target_modules},
        layer_scales={m: tuple(layer_scales[m]) for m in target_modules},
        tensors={m: tuple(tensors[m]) for m in target_modules},
        use_rslora=cfg["use_rslora"],
        dtype=np.dtype(dtype).name,
        nbytes=nbytes,
    )


def load_peft_adapter(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    max_rank: int,
    name: str | None = None,
    dtype=np.float32,
) -> LoraWeights:
    """Loads a PEFT adapter as rank-rows: a[m] (L, r_m, in_m), b[m] (L, r_m, out_m)."""
    spec = read_peft_adapter_spec(path, config, max_rank=max_rank, name=name, dtype=dtype)
    names = {n for m in spec.target_modules for pair in spec.tensors[m] if pair for n in pair[:2]}
    raw = _safetensors.read_tensors(spec.weights_file, sorted(names))
    for tensor, values in raw.items():
        bad = ~np.isfinite(values)
        if bad.any():
            raise FormatError(
                f"{spec.weights_file}: tensor {tensor!r} holds {int(bad.sum())} NaN or infinite "
                "values; expected finite weights"
            )
    shapes = config.module_shapes()
    dtype = np.dtype(dtype)
    a, b = {}, {}
    for m in spec.target_modules:
        fan_in, fan_out = shapes[m]
        a[m] = np.zeros((config.num_layers, spec.ranks[m], fan_in), dtype)
        b[m] = np.zeros((config.num_layers, spec.ranks[m], fan_out), dtype)
        for layer, pair in enumerate(spec.tensors[m]):
            if pair is None:
                continue
            rank = spec.layer_ranks[m][layer]
            ratio = spec.layer_scales[m][layer] / spec.scales[m] if spec.scales[m] else 0.0
            b_rows = raw[pair[1]].T
            if len(pair) == 4:  # a member of a fused module: its columns of B's rows
                b_rows = b_rows[:, pair[2] : pair[3]]
            # The file's values are finite (checked above), but the cast to dtype can still
            # make one infinite (an F64 weight past float32's range): refused just below.
            with np.errstate(over="ignore"):
                a[m][layer, :rank] = raw[pair[0]]
                b[m][layer, :rank] = b_rows if ratio == 1.0 else b_rows.astype(np.float32) * ratio
            for tensor, stored, served in (
                (pair[0], raw[pair[0]], a[m][layer, :rank]),
                (pair[1], b_rows, b[m][layer, :rank]),
            ):
                _safetensors.check_finite(spec.weights_file, tensor, stored, served)
    return LoraWeights(name=spec.name, a=a, b=b, scales=dict(spec.scales), source=spec.path)


def _check_weights(weights: LoraWeights, config: ModelConfig) -> None:
    shapes = config.module_shapes()
    for m in weights.a:
        if m not in shapes:
            raise AdapterError(
                f"adapter {weights.name!r}: module {m!r} is not LoRA-able; "
                f"expected one of {', '.join(MODULES)}"
            )
        if m not in weights.b or m not in weights.scales:
            raise AdapterError(
                f"adapter {weights.name!r}: module {m!r} has A rows but no B rows or no scale"
            )
        fan_in, fan_out = shapes[m]
        rank = weights.a[m].shape[1] if weights.a[m].ndim == 3 else -1
        for factor, array, width in (("a", weights.a[m], fan_in), ("b", weights.b[m], fan_out)):
            expected = (config.num_layers, rank, width)
            if array.shape != expected or rank <= 0:
                raise AdapterError(
                    f"adapter {weights.name!r}: {factor}[{m!r}] has shape "
                    f"{array.shape}; expected {expected}"
                )


def _peft_view(weights: LoraWeights, config: ModelConfig):
    """The adapter as PEFT's modules hold it: (modules, a, b, scales, ranks) keyed by
    peft_modules(config). A fused module (Phi-3's qkv_proj, gate_up_proj) is one LoRA of rank
    the sum of its members' ranks: their A rows stacked, and B block-diagonal (each member's B
    in its own output rows and rank columns, its scale's ratio to the first member's folded
    in; a member the adapter leaves out keeps zero rows). Exactly what the members compute."""
    shapes = config.module_shapes()
    modules, a, b, scales = [], {}, {}, {}
    for module in peft_modules(config):
        members = FUSED_PEFT_MODULES.get(module, (module,))
        present = [m for m in members if m in weights.a]
        if not present:
            continue
        modules.append(module)
        if members == (module,):
            a[module], b[module] = weights.a[module], weights.b[module]
            scales[module] = float(weights.scales[module])
            continue
        scale = float(weights.scales[present[0]])
        a[module] = np.concatenate([weights.a[m] for m in present], axis=1)  # (L, R, in)
        dtype = weights.b[present[0]].dtype
        out = sum(shapes[m][1] for m in members)
        fused_b = np.zeros((config.num_layers, a[module].shape[1], out), dtype)
        row, column = 0, 0
        for m in members:
            if m in present:
                rank = weights.a[m].shape[1]
                ratio = float(weights.scales[m]) / scale if scale else 0.0
                block = weights.b[m]
                if ratio != 1.0:
                    block = (block.astype(np.float32) * ratio).astype(dtype)
                fused_b[:, row : row + rank, column : column + shapes[m][1]] = block
                row += rank
            column += shapes[m][1]
        b[module], scales[module] = fused_b, scale
    ranks = {m: a[m].shape[1] for m in modules}
    return modules, a, b, scales, ranks


def save_peft_adapter(
    path: str | os.PathLike,
    weights: LoraWeights,
    config: ModelConfig,
    *,
    alpha: float | None = None,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> str:
    """Writes a PEFT-loadable adapter directory; returns its path.

    alpha=None: each module's lora_alpha is scales[m] * r_m (alpha_pattern where modules differ).
    alpha given: lora_alpha = alpha for every module and each module's B is multiplied by
    scales[m] / (alpha / r_m), so the adapter computes exactly what `weights` computes.
    use_rslora: the config says rsLoRA (scale alpha / sqrt(r), as an adapter trained with it
    was), and sqrt(r_m) stands for r_m above. base_model_name_or_path: the base model PEFT's
    ``AutoPeftModel`` loads (default: the config's name).
    For Phi-3 the modules are its fused ones (``_peft_view``: q, k, v as one LoRA on qkv_proj
    of the summed rank, B block-diagonal; gate, up on gate_up_proj).
    """
    _check_weights(weights, config)
    if not weights.a:
        raise AdapterError(f"adapter {weights.name!r}: targets no module; nothing to save")
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"use_rslora: expected a bool, got {use_rslora!r}")
    modules, a, b, scales, ranks = _peft_view(weights, config)
    top_rank = max(ranks.values())
    per_rank = math.sqrt if use_rslora else float  # (what PEFT divides lora_alpha by)
    wanted_alpha = {m: scales[m] * per_rank(ranks[m]) for m in modules}
    if alpha is None:
        lora_alpha = wanted_alpha[next(m for m in modules if ranks[m] == top_rank)]
        alpha_pattern = {m: a for m, a in wanted_alpha.items() if a != lora_alpha}
        b_factor = dict.fromkeys(modules, 1.0)
    else:
        lora_alpha = float(alpha)
        alpha_pattern = {}
        b_factor = {m: wanted_alpha[m] / lora_alpha for m in modules}
    tensors = {}
    for m in modules:
        for layer in range(config.num_layers):
            key = f"{TENSOR_PREFIX}{_module_key(layer, m)}"
            b_rows = b[m][layer]
            if b_factor[m] != 1.0:
                b_rows = (b_rows.astype(np.float32) * b_factor[m]).astype(b_rows.dtype)
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[m][layer])
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_rows.T)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.name,
        "r": top_rank,
        "lora_alpha": lora_alpha,
        "target_modules": modules,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top_rank},
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(adapter_config, f, indent=2)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    return directory

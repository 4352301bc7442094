"""Frozen configuration dataclasses: the base model and the adapter page pool."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxlora.errors import ConfigError


def is_int(value) -> bool:
    """An int (a numpy integer too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite int or float (numpy's too), not a bool."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def is_positive_int(value) -> bool:
    """An int > 0 (a numpy integer too), not a bool."""
    return is_int(value) and value > 0


def _is_positive_number(value) -> bool:
    return is_finite_number(value) and value > 0


def _is_norm_epsilon(value) -> bool:
    """An RMSNorm epsilon: finite and >= 0 (one < 0 makes NaN norms)."""
    return is_finite_number(value) and value >= 0


def require_positive_ints(obj, fields: tuple[str, ...], what: str) -> None:
    """Raises ConfigError naming `what` and the field unless every field is an int > 0."""
    for field in fields:
        value = getattr(obj, field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{what} field {field!r}: expected a positive int, got {value!r}")


def parse_positive_ints(items: list[str] | None, *, flag: str) -> tuple[int, ...] | None:
    """A comma-list flag's positive ints (None where unset); ConfigError naming the flag and
    the item otherwise."""
    if items is None:
        return None
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"{flag}: expected positive integers, got {item!r}")
        values.append(value)
    return tuple(values)


def parse_json(text: str, *, where: str) -> Any:
    """A JSON flag's value; ConfigError naming ``where`` if it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from e


# config.json's model_type -> the transformers class of that family's causal LM.
HF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Gemma 2 and 3: norms after attention and the MLP (ModelConfig.sandwich_norms), sliding
# layers among full ones (ModelConfig.local_window, sliding_period).
LAYERED_GEMMA_TYPES = ("gemma2", "gemma3_text")
# Families whose RMSNorm computes x * (1 + w) (ModelConfig.hf_norm_offset) and whose embeddings
# are scaled by sqrt(hidden) (ModelConfig.embedding_multiplier).
GEMMA_TYPES = ("gemma", *LAYERED_GEMMA_TYPES)
# The MLP's gate activations (config.json's hidden_act; Gemma's hidden_activation):
# transformers' names -> what they compute.
HIDDEN_ACTIVATIONS = {
    "silu": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",  # GELU's tanh approximation (Gemma's)
    "gelu": "gelu",  # GELU exactly (erf)
}
# Families whose checkpoints store q|k|v and gate|up as one tensor each (qkv_proj,
# gate_up_proj), and whose PEFT adapters target those.
FUSED_CHECKPOINT_TYPES = ("phi3",)
# Families whose config.json may set a sliding attention window for every layer
# (ModelConfig.sliding_window): every query attends to the last `sliding_window` keys only.
SLIDING_WINDOW_TYPES = ("mistral", "phi3")
# Families whose config.json may make its last layers sliding (use_sliding_window: the layers
# from max_window_layers on attend to the last sliding_window keys, the earlier ones to all):
# ModelConfig.local_window, max_window_layers.
WINDOW_FROM_LAYER_TYPES = ("qwen2", "qwen3")


# transformers' config classes' defaults of the fields this reader uses (the same in
# transformers 4 and 5), by model_type: a config.json that leaves a field out gets the value
# transformers gives it, not another family's. (Gemma 2 / 3 take their activation from
# hidden_activation, gelu_pytorch_tanh where absent: from_hf_dict.)
HF_FIELD_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "num_key_value_heads": 32,
        "head_dim": 128,
    },
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "gemma": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
    },
    "gemma2": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "num_key_value_heads": 4,
        "head_dim": 256,
    },
    "gemma3_text": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rope_theta": 1000000.0,
    },
}


# Bounds no real checkpoint comes near (the largest open models have ~126 layers and ~2e12
# parameters, the longest contexts ~1e7 positions): a config beyond them is a typo or a
# hostile file, which would otherwise hang building per-layer tables (10^30 layers) or fail
# deep inside an allocation. Positions are int32 on the device.
MAX_LAYERS = 4096
MAX_PARAMETERS = 10**13
MAX_POSITIONS = 2**31 - 1


def _is_layer_count(value) -> bool:
    return is_positive_int(value) and value <= MAX_LAYERS


def model_parameters(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> int:
    """The parameters of the projections, the MLPs and one embedding table (norms and biases,
    a rounding error, left out): what bounds a config's size."""
    attention = hidden_size * (2 * num_heads + 2 * num_kv_heads) * head_dim
    mlp = 3 * hidden_size * intermediate_size
    return vocab_size * hidden_size + num_layers * (attention + mlp)


# config.json fields that from_hf_dict computes with before ModelConfig could check them
# (hidden_size // num_attention_heads, range(num_hidden_layers), set(layer_types)), or that
# ModelConfig checks under a name of its own (num_layers): (check, what it expects), checked
# where present, each named as the file names it. A wrong type there was a bare TypeError /
# ZeroDivisionError, or a message naming a field the file does not have.
HF_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(
        (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
        ),
        (is_positive_int, "a positive int"),
    ),
    "num_hidden_layers": (_is_layer_count, f"a positive int up to {MAX_LAYERS:,}"),
    **dict.fromkeys(
        ("num_key_value_heads", "head_dim"),
        (lambda v: v is None or is_positive_int(v), "a positive int or null"),
    ),
    "layer_types": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
        "a list of strings or null",
    ),
    # Gemma 3's sliding layers' RoPE base (0 or NaN: NaN frequencies)
    "rope_local_base_freq": (_is_positive_number, "a finite number > 0"),
}


# HF rope_scaling types whose frequencies are fixed (not a function of the sequence length).
ROPE_SCALING_TYPES = ("llama3", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling of HF's `rope_scaling` / `rope_parameters`, as transformers computes it
    (modeling_rope_utils): "llama3" (Llama 3.1's frequency-dependent scaling: factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings), "linear" (every
    frequency divided by factor: position interpolation) or "yarn" (YaRN, as Qwen2.5 / Qwen3
    enable it for long contexts: frequencies interpolated below the beta_slow / beta_fast
    correction range, kept above it, ramped between; cos and sin multiplied by
    `attention_scaling`). The "dynamic" and "longrope" types change the frequencies with the
    sequence's length, which keys already in a KV cache cannot follow: refused."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    # YaRN's: the correction range's rotation counts; attention_factor overrides the cos / sin
    # scale that factor (with mscale / mscale_all_dim, DeepSeek's form) implies; truncate
    # rounds the correction range to whole dimensions.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"rope scaling field 'rope_type': expected one of {list(ROPE_SCALING_TYPES)}, "
                f"got {self.rope_type!r}"
            )
        # (finite: an infinite factor makes every frequency 0 and the context length an
        # OverflowError; a llama3 factor that is not a number a TypeError in the RoPE table)
        for field in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            value = getattr(self, field)
            if not _is_positive_number(value):
                raise ConfigError(
                    f"rope scaling field {field!r}: expected a positive number, got {value!r}"
                )
        if self.rope_type == "yarn" and self.factor < 1:
            raise ConfigError(
                f"rope scaling field 'factor': expected >= 1 for yarn, got {self.factor!r}"
            )
        require_positive_ints(self, ("original_max_position_embeddings",), "rope scaling")
        for field in ("attention_factor", "mscale", "mscale_all_dim"):
            value = getattr(self, field)
            if value is not None and (
                not is_finite_number(value)
                or value < 0
                or (field == "attention_factor" and value == 0)
            ):
                raise ConfigError(
                    f"rope scaling field {field!r}: expected None or a positive number, "
                    f"got {value!r}"
                )
        if not isinstance(self.truncate, bool):
            raise ConfigError(
                f"rope scaling field 'truncate': expected a bool, got {self.truncate!r}"
            )

    @property
    def attention_scaling(self) -> float:
        """The factor on cos and sin (YaRN's; 1 for the other types), as transformers'."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def magnitude(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return magnitude(self.factor, self.mscale) / magnitude(self.factor, self.mscale_all_dim)
        return magnitude(self.factor)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields transformers reads for this type."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        elif self.rope_type == "yarn":
            d.update(
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
            )
            for field in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, field) is not None:
                    d[field] = getattr(self, field)
            if not self.truncate:
                d["truncate"] = False
        return d


def _sliding_layer_types(layers: int, period: int) -> list[str]:
    """transformers' layer_types of a Gemma whose layer i is full every period-th layer
    ((i + 1) % period == 0) and sliding otherwise."""
    return [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)
    ]


def _sliding_window_field(cfg: dict[str, Any], source: str, default: int | None) -> int | None:
    """config.json's sliding_window (``default`` where absent): a positive int or null."""
    window = cfg.get("sliding_window", default)
    if window is not None and not is_positive_int(window):  # (true is no window size)
        raise ConfigError(
            f"{source}: field 'sliding_window' is {window!r}; expected a positive int or null"
        )
    return window


def _window_from_layer_fields(cfg: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
    """Qwen2's and Qwen3's sliding layers, read as transformers reads them: with
    use_sliding_window, the layers from max_window_layers (28 where absent) on attend to the
    last sliding_window (4,096 where absent) keys, the earlier ones to all; without it, none
    slides. layer_types, where given, decides which layers slide and must be that pattern
    (full_attention up to a layer, sliding_attention from it on)."""
    layers = cfg.get("num_hidden_layers", 0)
    enabled = cfg.get("use_sliding_window", False)
    if not isinstance(enabled, bool):
        raise ConfigError(
            f"{source}: field 'use_sliding_window' is {enabled!r}; expected true or false"
        )
    window = _sliding_window_field(cfg, source, 4096) if enabled else None
    kinds = cfg.get("layer_types")
    if kinds is not None:
        kinds = list(kinds)
        first = kinds.index("sliding_attention") if "sliding_attention" in kinds else len(kinds)
        pattern = ["full_attention"] * first + ["sliding_attention"] * (len(kinds) - first)
        if kinds != pattern or len(kinds) != layers:
            raise ConfigError(
                f"{source}: field 'layer_types' is {kinds!r}; expected {model_type}'s pattern "
                f"for its {layers} layers: full_attention up to a layer, sliding_attention from "
                "it on"
            )
        if first < layers and window is None:
            raise ConfigError(
                f"{source}: field 'layer_types' has sliding_attention layers but "
                "'use_sliding_window' is false; expected true (with a sliding_window) or "
                "full_attention everywhere"
            )
    else:
        first = cfg.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ConfigError(
                f"{source}: field 'max_window_layers' is {first!r}; expected an int >= 0"
            )
    if window is None or first >= layers:
        return {}
    return dict(local_window=window, max_window_layers=first)


def _gemma_window_fields(cfg: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
    """Gemma 2's and Gemma 3's config.json fields (transformers' defaults where absent). Their
    layer_types, where given, must be their pattern: every period-th layer full, the others
    sliding (Gemma 2: period 2, sliding first; Gemma 3: sliding_window_pattern, 6), or full
    everywhere (no window)."""
    gemma2 = model_type == "gemma2"
    layers = cfg.get("num_hidden_layers", 0)
    kinds = cfg.get("layer_types")
    period = 2 if gemma2 else cfg.get("sliding_window_pattern", 6)
    if kinds is not None and "full_attention" in kinds and "sliding_attention" in kinds:
        period = list(kinds).index("full_attention") + 1
    elif kinds is not None and kinds and set(kinds) == {"sliding_attention"}:
        # Every layer sliding (transformers' default for fewer layers than the pattern's
        # period, as save_pretrained writes it): a period no layer reaches.
        period = len(kinds) + 1
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ConfigError(
            f"{source}: field 'sliding_window_pattern' is {period!r}; expected a positive int"
        )
    patterns = (_sliding_layer_types(layers, period), ["full_attention"] * layers)
    if kinds is not None and list(kinds) not in patterns:
        raise ConfigError(
            f"{source}: field 'layer_types' is {kinds!r}; expected {model_type}'s pattern "
            "(every n-th layer full_attention, the others sliding_attention) or "
            "full_attention everywhere"
        )
    window = _sliding_window_field(cfg, source, 4096)
    all_full = kinds is not None and set(kinds) == {"full_attention"}
    fields = dict(
        # (transformers' Gemma 3 keeps attn_logit_softcapping but never caps the scores)
        attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0) if gemma2 else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0 if gemma2 else None),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        local_window=None if all_full else window,
        sliding_period=period,
    )
    if not gemma2:
        fields["local_rope_theta"] = float(cfg.get("rope_local_base_freq", 10000.0))
    return fields


def _rope_parameters_as_top_level_fields(
    cfg: dict[str, Any], source: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """cfg with transformers 5's rope_parameters (what its save_pretrained writes instead of
    the top-level rope_theta and rope_scaling; Gemma 3's, one object a layer type) read into
    the transformers 4 fields from_hf_dict reads, as transformers 5 reads them: its rope_theta
    and partial_rotary_factor before the top-level ones, its scaling unless a rope_scaling is
    set (which replaces the whole object, its rope_theta too); and, for the messages, where in
    the file each field set here came from. Without it, a llama3-scaled model with base 500,000
    was read as unscaled with base 10,000."""
    rope = cfg.get("rope_parameters")
    if rope is None:
        return cfg, {}
    cfg, origins, where = dict(cfg), {}, "rope_parameters"
    if isinstance(rope, dict) and {"full_attention", "sliding_attention"} & set(rope):
        # Gemma 3's: the full layers' is the model's RoPE (scaled or not); the sliding
        # layers' may only set their own base.
        local = rope.get("sliding_attention") or {}
        if not isinstance(local, dict):
            raise ConfigError(
                f"{source}: field 'rope_parameters.sliding_attention' is {local!r}; expected an "
                "object"
            )
        if local.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: field 'rope_parameters.sliding_attention' is {local!r}; expected "
                "rope_type 'default' (the sliding layers' scaling is not supported)"
            )
        if "rope_theta" in local:  # (transformers 5 prefers it to rope_local_base_freq)
            cfg["rope_local_base_freq"] = local["rope_theta"]
            origins["rope_local_base_freq"] = "rope_parameters.sliding_attention.rope_theta"
        rope, where = rope.get("full_attention") or {}, "rope_parameters.full_attention"
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: field {where!r} is {rope!r}; expected an object")
    if cfg.get("rope_scaling"):
        return cfg, origins
    for field in ("rope_theta", "partial_rotary_factor"):  # (Phi-3 keeps the factor here)
        if rope.get(field) is not None:
            cfg[field], origins[field] = rope[field], f"{where}.{field}"
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        cfg["rope_scaling"], origins["rope_scaling"] = scaling, where
    return cfg, origins


def rope_scaling_from_hf(
    cfg: dict[str, Any], source: str, field: str = "rope_scaling"
) -> RopeScaling | None:
    """config.json's rope_scaling, read as transformers 5 reads it: original_max_position_
    embeddings from the top level where a checkpoint keeps it there (Phi-3), else the scaling's
    own, else max_position_embeddings. field: where the file keeps it, for the messages
    (rope_parameters in transformers 5's, _rope_parameters_as_top_level_fields)."""
    raw = cfg.get("rope_scaling")
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field {field!r} is {raw!r}; expected an object")
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_SCALING_TYPES:
        why = (
            " (its frequencies change with the sequence's length, which the keys already in "
            "the KV cache cannot follow)"
            if rope_type in ("dynamic", "longrope", "su")
            else ""
        )
        raise ConfigError(
            f"{source}: field '{field}.rope_type' is {rope_type!r}; expected one of "
            f"{['default', *ROPE_SCALING_TYPES]}{why}"
        )
    max_positions = cfg.get("max_position_embeddings", 4096)
    original = cfg.get("original_max_position_embeddings") or raw.get(
        "original_max_position_embeddings", max_positions
    )
    factor = raw.get("factor")
    if factor is None:
        raise ConfigError(f"{source}: field '{field}.factor' is missing ({rope_type})")
    fields: dict[str, Any] = dict(rope_type=rope_type, factor=factor)
    if rope_type != "linear":  # (linear's frequencies do not depend on it)
        fields["original_max_position_embeddings"] = original
    names = {
        "llama3": ("low_freq_factor", "high_freq_factor"),
        "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"),
        "linear": (),
    }[rope_type]
    for name in names:
        if raw.get(name) is not None:
            fields[name] = raw[name]
    if rope_type == "yarn" and "truncate" in raw:
        fields["truncate"] = raw["truncate"]
    try:
        return RopeScaling(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: field {field!r}: {e}") from None


def read_config_json(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(the file's path, its JSON object) of a HF config.json or of the one in a directory;
    ConfigError naming the file for one that is missing or not a JSON object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found (expected a HF config.json)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except (ValueError, RecursionError) as e:  # (an int of 4,300+ digits, nesting too deep)
        raise ConfigError(f"{path}: not a usable JSON document ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return path, data


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (what HF `config.json` describes)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    name: str = "llama"
    # The HF family (config.json's model_type, HF_MODEL_TYPES): Llama, Mistral and Phi-3 are
    # one architecture (Phi-3's checkpoints fuse q|k|v and gate|up); Qwen2 adds q/k/v biases
    # (qkv_bias), Qwen3 per-head q/k norms (qk_norm), Gemma scaled embeddings
    # (embedding_multiplier), RMSNorm weights stored minus 1 (hf_norm_offset) and GELU; Gemma 2
    # also norms after attention and the MLP (sandwich_norms) and soft-capped logits.
    model_type: str = "llama"
    # Mistral's / Phi-3's sliding attention window, where the checkpoint sets one: each query
    # attends to the last ``sliding_window`` keys (itself included), as HF's mask does.
    sliding_window: int | None = None
    # The gate's activation in the MLP (gate_act(x W_gate) * x W_up), by transformers' name
    # (HIDDEN_ACTIVATIONS): SiLU for every family but Gemma's GELU (tanh approximation).
    hidden_act: str = "silu"
    # Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap)); queries
    # scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    # The sliding window of a model's sliding layers (transformers' layer_types), where each
    # query attends to the last local_window keys: Gemma 2's and 3's layer i is full when
    # (i + 1) % sliding_period == 0 (Gemma 2: 2, every other layer from the second; Gemma 3:
    # 6) and sliding otherwise; Qwen2's and Qwen3's (use_sliding_window) layers slide from
    # max_window_layers on. The KV cache keeps every page (the full layers read them).
    local_window: int | None = None
    sliding_period: int = 2
    max_window_layers: int | None = None
    # Gemma 3: the sliding layers' RoPE base, unscaled; rope_theta and rope_scaling are the
    # full layers'.
    local_rope_theta: float | None = None

    def __post_init__(self):
        require_positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "max_position_embeddings",
            ),
            "model config",
        )
        self._check_bounds()
        if self.model_type not in HF_MODEL_TYPES:
            raise ConfigError(
                f"model config field 'model_type': expected one of {sorted(HF_MODEL_TYPES)}, "
                f"got {self.model_type!r}"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window < 1
            or self.model_type not in SLIDING_WINDOW_TYPES
        ):
            raise ConfigError(
                f"model config field 'sliding_window': expected None, or an int >= 1 for "
                f"{list(SLIDING_WINDOW_TYPES)}; got {self.sliding_window!r} for "
                f"{self.model_type!r}"
            )
        for field in (
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "query_pre_attn_scalar",
            "local_window",
            "sliding_period",
            "local_rope_theta",
        ):
            value = getattr(self, field)
            # (finite: an infinite soft cap makes inf * tanh(x / inf), NaN logits)
            valid = (
                is_positive_int
                if field in ("local_window", "sliding_period")
                else _is_positive_number
            )
            if value is not None and not valid(value):
                raise ConfigError(
                    f"model config field {field!r}: expected None or a positive number, "
                    f"got {value!r}"
                )
        self._check_sliding_layers()
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ConfigError(
                f"model config field 'hidden_act': expected one of {sorted(HIDDEN_ACTIVATIONS)}, "
                f"got {self.hidden_act!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    def _check_bounds(self):
        """The bounds of MAX_LAYERS, MAX_PARAMETERS and MAX_POSITIONS; rope_theta and
        rms_norm_eps as the config.json reader bounds them (a base <= 0 or NaN makes NaN
        frequencies, an epsilon < 0 NaN norms)."""
        if self.num_layers > MAX_LAYERS:
            raise ConfigError(
                f"model config field 'num_layers': expected at most {MAX_LAYERS:,} layers, got "
                f"{self.num_layers:,}"
            )
        parameters = model_parameters(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        if parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"model config: {parameters:.3g} parameters (vocab_size {self.vocab_size:,}, "
                f"hidden_size {self.hidden_size:,}, intermediate_size "
                f"{self.intermediate_size:,}, num_layers {self.num_layers:,}, heads "
                f"{self.num_heads:,} / {self.num_kv_heads:,} of head_dim {self.head_dim:,}); "
                f"expected at most {MAX_PARAMETERS:.0e}"
            )
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(
                f"model config field 'max_position_embeddings': expected at most "
                f"{MAX_POSITIONS:,} (positions are int32), got {self.max_position_embeddings:,}"
            )
        if not _is_positive_number(self.rope_theta):
            raise ConfigError(
                f"model config field 'rope_theta': expected a finite number > 0, got "
                f"{self.rope_theta!r}"
            )
        if not _is_norm_epsilon(self.rms_norm_eps):
            raise ConfigError(
                f"model config field 'rms_norm_eps': expected a finite number >= 0, got "
                f"{self.rms_norm_eps!r}"
            )

    def _check_sliding_layers(self):
        """local_window only for the families with sliding layers; max_window_layers (a layer
        index, 0 for every layer sliding) for Qwen2's and Qwen3's, with their window."""
        layered = (*LAYERED_GEMMA_TYPES, *WINDOW_FROM_LAYER_TYPES)
        if self.local_window is not None and self.model_type not in layered:
            raise ConfigError(
                f"model config field 'local_window': expected None for {self.model_type!r} "
                f"(the families with sliding layers: {list(layered)}); got {self.local_window!r}"
            )
        mwl = self.max_window_layers
        windowed_qwen = self.model_type in WINDOW_FROM_LAYER_TYPES and self.local_window
        if windowed_qwen and (
            mwl is None
            or isinstance(mwl, bool)
            or not isinstance(mwl, int)
            or not 0 <= mwl < self.num_layers
        ):
            raise ConfigError(
                f"model config field 'max_window_layers': expected the first sliding layer, an "
                f"int in 0..{self.num_layers - 1}, for {self.model_type!r} with a local_window; "
                f"got {mwl!r}"
            )
        if mwl is not None and not windowed_qwen:
            raise ConfigError(
                f"model config field 'max_window_layers': expected None without a local_window "
                f"of {list(WINDOW_FROM_LAYER_TYPES)}; got {mwl!r} for {self.model_type!r}"
            )

    @property
    def context_length(self) -> int:
        """The longest sequence the model is made for: max_position_embeddings, or where a
        linear / yarn RoPE scaling stretches a shorter original context (Qwen2.5's and Qwen3's
        YaRN leave max_position_embeddings at the original) that stretch, as vLLM derives its
        max_model_len: yarn's original x factor, linear's max_position_embeddings x factor.
        Gemma 3's config.json states its scaled context itself (131,072 with linear x8)."""
        scaling = self.rope_scaling
        length = self.max_position_embeddings
        stated = (
            scaling is None or scaling.rope_type == "llama3" or self.model_type == "gemma3_text"
        )
        if not stated:
            base = (
                scaling.original_max_position_embeddings
                if scaling.rope_type == "yarn"
                else self.max_position_embeddings
            )
            length = max(length, int(base * scaling.factor))
        return length

    @property
    def embedding_multiplier(self) -> float | None:
        """Gemma multiplies the token embeddings by sqrt(hidden_size), rounded to the
        activations' dtype (its tied LM head reads the table unscaled); None elsewhere."""
        return math.sqrt(self.hidden_size) if self.model_type in GEMMA_TYPES else None

    @property
    def hf_norm_offset(self) -> float:
        """What HF's RMSNorm adds to its stored weight: Gemma's computes x * (1 + w), so its
        checkpoints hold the scale minus 1; jaxlora's params hold the scale itself (the HF
        loader adds this, the writer subtracts it). 0 elsewhere."""
        return 1.0 if self.model_type in GEMMA_TYPES else 0.0

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2 normalizes the attention's and the MLP's outputs before each residual add
        (its post_attention_layernorm and post_feedforward_layernorm; the MLP's input norm is
        its pre_feedforward_layernorm)."""
        return self.model_type in LAYERED_GEMMA_TYPES

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: query_pre_attn_scalar ** -0.5 (Gemma 2), else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def activation(self) -> str:
        """The gate activation's arithmetic: "silu", "gelu_tanh" or "gelu"."""
        return HIDDEN_ACTIVATIONS[self.hidden_act]

    @property
    def qkv_bias(self) -> bool:
        """q, k and v projections carry a bias (Qwen2; o and the MLP do not)."""
        return self.model_type == "qwen2"

    @property
    def fused_checkpoint(self) -> bool:
        """The HF checkpoint and PEFT adapters hold qkv_proj and gate_up_proj (Phi-3)."""
        return self.model_type in FUSED_CHECKPOINT_TYPES

    @property
    def qk_norm(self) -> bool:
        """Each q and k head is RMS-normalized over head_dim (a scale of its own per layer,
        shared by the heads) before RoPE (Qwen3, Gemma 3)."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def attention_window(self) -> int | None:
        """The sliding window the attention masks with, None where it never binds (no window,
        or one as long as the context)."""
        window = self.sliding_window
        return window if window is not None and window < self.max_position_embeddings else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable linear module."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Reads a HF Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma `config.json` dictionary,
        as transformers 4 or 5 writes it. A field of the wrong type or value is a ConfigError
        naming ``source``, the field and what was expected."""

        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: missing field {key!r}")
            return cfg[key]

        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; expected one of "
                f"{sorted(HF_MODEL_TYPES)}"
            )
        cfg, origins = _rope_parameters_as_top_level_fields(cfg, source)
        cfg = {**HF_FIELD_DEFAULTS[model_type], **cfg}
        for field, (valid, expected) in HF_FIELD_CHECKS.items():
            if field in cfg and not valid(cfg[field]):
                raise ConfigError(
                    f"{source}: field {origins.get(field, field)!r} is {cfg[field]!r}; "
                    f"expected {expected}"
                )
        for field in ("attention_bias", "mlp_bias"):
            # Qwen2's q/k/v biases are its architecture's, not this field's.
            if cfg.get(field):
                raise ConfigError(
                    f"{source}: field {field!r} is {cfg[field]!r}; expected false (biased "
                    "o / MLP projections are not supported)"
                )
        if cfg.get("use_bidirectional_attention"):
            raise ConfigError(
                f"{source}: field 'use_bidirectional_attention' is "
                f"{cfg['use_bidirectional_attention']!r}; expected false (an embedding model, "
                "not a causal LM)"
            )
        sliding_window = None
        rotary = cfg.get("partial_rotary_factor", 1.0)
        if rotary != 1.0:
            field = origins.get("partial_rotary_factor", "partial_rotary_factor")
            raise ConfigError(
                f"{source}: field {field!r} is {rotary!r}; expected 1.0 (RoPE on part of each "
                "head is not supported)"
            )
        if model_type in SLIDING_WINDOW_TYPES:
            sliding_window = _sliding_window_field(cfg, source, None)
        elif model_type not in WINDOW_FROM_LAYER_TYPES and cfg.get("use_sliding_window"):
            raise ConfigError(
                f"{source}: field 'use_sliding_window' is true; expected false (sliding-window "
                f"layers of {model_type} are not supported)"
            )
        windowed_types = (*SLIDING_WINDOW_TYPES, *LAYERED_GEMMA_TYPES, *WINDOW_FROM_LAYER_TYPES)
        if model_type not in windowed_types and any(
            kind != "full_attention" for kind in cfg.get("layer_types") or ()
        ):
            raise ConfigError(
                f"{source}: field 'layer_types' is {cfg['layer_types']!r}; expected "
                "'full_attention' for every layer (sliding-window layers are not supported)"
            )
        act_field, act = "hidden_act", cfg.get("hidden_act", "silu")
        if model_type in LAYERED_GEMMA_TYPES:
            # transformers' Gemma 2 and 3 read hidden_activation only.
            act_field, act = "hidden_activation", cfg.get("hidden_activation")
            act = act if act is not None else "gelu_pytorch_tanh"
        elif model_type in GEMMA_TYPES:
            # transformers 4 reads Gemma's hidden_activation and, where it is unset, uses the
            # tanh approximation the models were trained with whatever hidden_act says (the
            # first checkpoints say "gelu"); vLLM does the same.
            if cfg.get("hidden_activation") is not None:
                act_field, act = "hidden_activation", cfg["hidden_activation"]
            elif act in ("gelu", "gelu_pytorch_tanh"):
                act = "gelu_pytorch_tanh"
        if not isinstance(act, str) or act not in HIDDEN_ACTIVATIONS:
            raise ConfigError(
                f"{source}: field {act_field!r} is {act!r}; expected one of "
                f"{sorted(HIDDEN_ACTIVATIONS)}"
            )

        def typed(key, default, kind, bound=None):
            """cfg[key] (default where absent) as kind; bound: (a check of its value, what the
            check expects)."""
            value = cfg.get(key, default)
            expected = None
            if (kind is bool) != isinstance(value, bool) or not isinstance(
                value, int | float if kind is float else kind
            ):
                expected = {bool: "a bool", int: "an int", float: "a number"}[kind]
            elif bound is not None and not bound[0](value):
                expected = bound[1]
            if expected is not None:
                raise ConfigError(
                    f"{source}: field {origins.get(key, key)!r} is {value!r}; expected {expected}"
                )
            return kind(value)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        scaling = rope_scaling_from_hf(cfg, source, origins.get("rope_scaling", "rope_scaling"))
        fields = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            # (a base <= 0 or NaN makes NaN frequencies; an epsilon < 0 NaN norms)
            rope_theta=typed(
                "rope_theta", 10000.0, float, (_is_positive_number, "a finite number > 0")
            ),
            rope_scaling=scaling,
            rms_norm_eps=typed(
                "rms_norm_eps",
                1e-5,
                float,
                (_is_norm_epsilon, "a finite number >= 0"),
            ),
            # (transformers' Gemma configs tie them by default, and the 4.x ones that left it
            # at that did not write the field)
            tie_word_embeddings=typed("tie_word_embeddings", model_type in GEMMA_TYPES, bool),
            max_position_embeddings=typed("max_position_embeddings", 4096, int),
            name=str(cfg.get("_name_or_path") or model_type),
            model_type=model_type,
            sliding_window=sliding_window,
            hidden_act=act,
            **(
                _gemma_window_fields(cfg, source, model_type)
                if model_type in LAYERED_GEMMA_TYPES
                else _window_from_layer_fields(cfg, source, model_type)
                if model_type in WINDOW_FROM_LAYER_TYPES
                else {}
            ),
        )
        try:
            return cls(**fields)
        except ConfigError as e:
            # ModelConfig's own checks name its field, not the file the value came from.
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads a HF config.json (or the one in a directory): from_hf_dict's ModelConfig."""
        path, data = read_config_json(path)
        return cls.from_hf_dict(data, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {
            "model_type": self.model_type,
            "architectures": [HF_MODEL_TYPES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_hf_dict()
        if self.model_type in GEMMA_TYPES:
            d["hidden_activation"] = self.hidden_act  # (what transformers 4 reads)
        if self.model_type in LAYERED_GEMMA_TYPES:
            d.update(
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.local_window,
                layer_types=_sliding_layer_types(
                    self.num_layers, self.sliding_period if self.local_window else 1
                ),
            )
        if self.local_rope_theta is not None:
            d["rope_local_base_freq"] = self.local_rope_theta
        if self.model_type in WINDOW_FROM_LAYER_TYPES:
            first = self.num_layers if self.local_window is None else self.max_window_layers
            d.update(
                use_sliding_window=self.local_window is not None,
                sliding_window=self.local_window,
                max_window_layers=first,
                layer_types=["full_attention"] * first
                + ["sliding_attention"] * (self.num_layers - first),
            )
        if self.model_type in SLIDING_WINDOW_TYPES:
            d["sliding_window"] = self.sliding_window
        return d


@dataclasses.dataclass(frozen=True)
class LoraPoolConfig:
    """The GPU adapter page pool (see pallas_kernels/layout.py for the layout).

    max_rank: the largest adapter rank accepted; rows_per_page: rank-rows in one page;
    pages_per_pool: pages in each width pool unless axis_pages names it; max_slots: how many
    distinct adapters one step can reference; axis_pages: (pool, pages) pairs for pools sized
    apart, pool one of pallas_kernels.layout.POOL_AXES (embed, heads, kv_heads, mlp); a dict
    is taken too.

    An adapter on all seven modules takes 7 pages of the embed pool for every 2 of heads, 2 of
    kv_heads and 3 of mlp (rank <= rows_per_page); one on q_proj and v_proj (PEFT's default for
    Llama) 2 of embed, 1 of heads, 1 of kv_heads and none of mlp. One page count for every pool
    leaves the rest idle; ``sized_for`` gives each pool what n adapters of one shape take.
    """

    max_rank: int = 64
    rows_per_page: int = 16
    pages_per_pool: int = 256
    max_slots: int = 32
    axis_pages: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        from pallas_kernels.layout import POOL_AXES  # pallas_kernels imports this module

        require_positive_ints(
            self, ("max_rank", "rows_per_page", "pages_per_pool", "max_slots"), "lora pool config"
        )
        # A mapping ({"mlp": 16}) or lists of pairs are taken as the tuple of pairs it stands for.
        pairs = self.axis_pages.items() if isinstance(self.axis_pages, dict) else self.axis_pages
        pairs = tuple(tuple(p) if isinstance(p, list) else p for p in pairs)
        object.__setattr__(self, "axis_pages", pairs)
        seen = set()
        for item in self.axis_pages:
            axis, pages = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
            if axis not in POOL_AXES or axis in seen:
                raise ConfigError(
                    f"lora pool config field 'axis_pages': expected (pool, pages) pairs, each "
                    f"pool once and one of {', '.join(POOL_AXES)}; got {item!r}"
                )
            if not isinstance(pages, int) or isinstance(pages, bool) or pages <= 0:
                raise ConfigError(
                    f"lora pool config field 'axis_pages': pool {axis!r} expected a positive "
                    f"int of pages, got {pages!r}"
                )
            seen.add(axis)

    def pages_in(self, axis: str) -> int:
        """Pages of one pool (POOL_AXES)."""
        return dict(self.axis_pages).get(axis, self.pages_per_pool)

    @classmethod
    def sized_for(
        cls,
        adapters: int,
        rank: int,
        *,
        modules: tuple[str, ...] | None = None,
        rows_per_page: int = 16,
        max_slots: int | None = None,
        max_rank: int | None = None,
    ) -> LoraPoolConfig:
        """Pools that hold `adapters` adapters of rank `rank` on `modules` (None: all seven) at
        once, each pool with the pages they take and no more (a pool they leave unused keeps
        one page); max_slots defaults to `adapters`, max_rank to `rank`."""
        from pallas_kernels import layout

        unknown = sorted(set(modules or ()) - set(layout.MODULES))
        if unknown:
            raise ConfigError(
                f"LoraPoolConfig.sized_for modules: {unknown} are not among {list(layout.MODULES)}"
            )
        need = layout.pool_pages_needed(
            dict.fromkeys(layout.MODULES if modules is None else modules, rank), rows_per_page
        )
        pages = {axis: max(1, adapters * n) for axis, n in need.items()}
        return cls(
            max_rank=rank if max_rank is None else max_rank,
            rows_per_page=rows_per_page,
            pages_per_pool=max(pages.values()),
            max_slots=adapters if max_slots is None else max_slots,
            axis_pages=tuple(pages.items()),
        )

    @property
    def max_pages_per_weight(self) -> int:
        return -(-self.max_rank // self.rows_per_page)

"""ModelConfig.from_hf_dict / from_hf_json on config.json fields of the wrong type or value:
each refused with a ConfigError naming the source, the field and what was expected (never a bare
TypeError / ZeroDivisionError / ValueError / UnicodeDecodeError, never a model that computes
inf or NaN), as read_hf_config refuses them; and a transformers 5 config.json (rope_parameters)
read as read_hf_config reads it."""

import dataclasses
import json
import math
import os

import pytest

from configs.models import TINY
from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.formats.hf import read_hf_config

SOURCE = "/m/config.json"
NAN = float("nan")
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _config(**changes) -> dict:
    """TINY's config.json with changes (None: the field left out)."""
    config = TINY.to_hf_dict()
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


GEMMA3 = {"model_type": "gemma3_text", "layer_types": None, "sliding_window": None}
BREAKAGES = {
    # name: (changes to TINY's config.json, the field the message names); comments: what
    # from_hf_dict did before
    "heads_a_string": ({"num_attention_heads": "4", "head_dim": None}, "num_attention_heads"),
    # (TypeError: unsupported operand type(s) for //)
    "heads_zero": ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    # (ZeroDivisionError)
    "heads_a_float": ({"num_attention_heads": 4.0, "head_dim": None}, "num_attention_heads"),
    # (named head_dim, a field the file does not set, without the file)
    "layers_a_float": ({"num_hidden_layers": 2.0}, "num_hidden_layers"),  # (file unnamed)
    "layers_a_string_windowed": (
        {
            "model_type": "qwen2",
            "num_hidden_layers": "2",
            "use_sliding_window": True,
            "layer_types": None,
        },
        "num_hidden_layers",
    ),  # (TypeError: '>=' not supported)
    "vocab_a_string": ({"vocab_size": "32"}, "vocab_size"),  # (file unnamed)
    "kv_heads_zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),  # (read as heads)
    "model_type_a_list": ({"model_type": ["llama"]}, "model_type"),  # (TypeError: unhashable)
    "hidden_act_a_list": ({"hidden_act": ["silu"]}, "hidden_act"),  # (TypeError: unhashable)
    "gemma_hidden_activation_a_list": (
        {"model_type": "gemma", "hidden_activation": ["gelu"]},
        "hidden_activation",
    ),  # (TypeError: unhashable)
    "layer_types_an_int": ({"layer_types": 2}, "layer_types"),  # (TypeError: not iterable)
    "gemma2_layer_types_of_lists": (
        {"model_type": "gemma2", "layer_types": [["sliding_attention"], ["full_attention"]]},
        "layer_types",
    ),  # (TypeError: unhashable)
    "rope_theta_zero": ({"rope_theta": 0}, "rope_theta"),  # (loaded: inf frequencies)
    "rope_theta_negative": ({"rope_theta": -10000.0}, "rope_theta"),  # (loaded: NaN)
    "rope_theta_nan": ({"rope_theta": NAN}, "rope_theta"),  # (loaded)
    "rms_norm_eps_negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),  # (loaded: NaN norms)
    "rms_norm_eps_inf": ({"rms_norm_eps": math.inf}, "rms_norm_eps"),  # (loaded)
    "gemma3_local_rope_a_string": (
        {**GEMMA3, "rope_local_base_freq": "x"},
        "rope_local_base_freq",
    ),  # (ValueError: could not convert string to float)
    "gemma3_local_rope_a_numeric_string": (
        {**GEMMA3, "rope_local_base_freq": "1e4"},
        "rope_local_base_freq",
    ),  # (loaded as 10000.0)
    "llama3_low_freq_factor_a_string": (
        {"rope_scaling": {**LLAMA3, "low_freq_factor": "1"}},
        "rope_scaling",
    ),  # (loaded; a TypeError in the RoPE table when the model is built)
    "linear_factor_inf": (
        {"rope_scaling": {"rope_type": "linear", "factor": math.inf}},
        "rope_scaling",
    ),  # (loaded: context_length an OverflowError, every frequency 0)
    "mistral_sliding_window_true": (
        {"model_type": "mistral", "sliding_window": True},
        "sliding_window",
    ),  # (file unnamed)
    "gemma2_final_softcapping_inf": (
        {
            "model_type": "gemma2",
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 8,
            "final_logit_softcapping": math.inf,
        },
        "final_logit_softcapping",
    ),  # (loaded: inf * tanh(x / inf) is NaN logits)
    "gemma2_layers_10_to_the_30": (
        {"model_type": "gemma2", "num_hidden_layers": 10**30, "layer_types": None},
        "num_hidden_layers",
    ),  # (hung building the layer-type pattern)
    "qwen2_layers_10_to_the_12": (
        {"model_type": "qwen2", "num_hidden_layers": 10**12, "use_sliding_window": True},
        "num_hidden_layers",
    ),
    "llama_layers_5000": ({"num_hidden_layers": 5000}, "num_hidden_layers"),
    "max_position_embeddings_beyond_int32": (
        {"max_position_embeddings": 2**31},
        "max_position_embeddings",
    ),  # (loaded: positions overflow int32 on the device)
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_from_hf_dict_refuses_fields_of_the_wrong_type_or_value_by_name(breakage):
    changes, field = BREAKAGES[breakage]
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict(_config(**changes), source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    assert f"'{field}'" in message, message
    assert "expected" in message, message


def test_from_hf_dict_names_the_source_for_model_config_checks():
    """ModelConfig's own checks (heads that the kv heads do not divide) said "model config: ..."
    without the file."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: .*num_kv_heads \(3\)"):
        ModelConfig.from_hf_dict(_config(num_key_value_heads=3), source=SOURCE)


def test_a_model_beyond_any_real_size_is_refused_naming_its_parameters():
    """More than 10^13 parameters (hidden 10^7, intermediate 10^6: 6e13) would fail deep inside
    an allocation; the message gives the count and the fields it comes from."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: model config: 6(\.\d+)?e\+13 parameters "):
        ModelConfig.from_hf_dict(
            _config(hidden_size=10**7, intermediate_size=10**6, head_dim=128), source=SOURCE
        )
    # The largest open models are far below the bound (about 4e11 parameters here).
    ModelConfig.from_hf_dict(
        _config(
            vocab_size=128256,
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
            head_dim=128,
        ),
        source=SOURCE,
    )


DIRECT_BREAKAGES = {
    # ModelConfig built directly (as a pipeline does) bounded rope_theta and rms_norm_eps only
    # in the config.json reader
    "rope_theta_zero": ({"rope_theta": 0.0}, "rope_theta"),
    "rope_theta_nan": ({"rope_theta": NAN}, "rope_theta"),
    "rope_theta_a_string": ({"rope_theta": "1e4"}, "rope_theta"),
    "rms_norm_eps_negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    "rms_norm_eps_inf": ({"rms_norm_eps": math.inf}, "rms_norm_eps"),
    "layers_5000": ({"num_layers": 5000}, "num_layers"),
    "positions_beyond_int32": ({"max_position_embeddings": 2**40}, "max_position_embeddings"),
}


@pytest.mark.parametrize("breakage", sorted(DIRECT_BREAKAGES))
def test_model_config_built_directly_refuses_values_the_reader_refuses(breakage):
    changes, field = DIRECT_BREAKAGES[breakage]
    with pytest.raises(ConfigError, match=rf"^model config field '{field}': expected"):
        dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("value", [[TINY.to_hf_dict()], "llama", None])
def test_from_hf_dict_refuses_what_is_not_an_object(value):
    """Was AttributeError: 'list' object has no attribute 'get'."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: expected a JSON object"):
        ModelConfig.from_hf_dict(value, source=SOURCE)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"model_type": "ll\xffama"}', "not valid JSON"),  # was UnicodeDecodeError
        (b"[1, 2]", "expected a JSON object"),  # was AttributeError
    ],
)
def test_from_hf_json_refuses_unreadable_files_naming_them(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    for source in (path, tmp_path):
        with pytest.raises(ConfigError, match=rf"^{path}: {expected}"):
            ModelConfig.from_hf_json(source)


ROPE_TABLE = os.path.join(os.path.dirname(__file__), "fixtures", "rope_hf.json")
with open(ROPE_TABLE) as _f:
    ROPE_CASES = json.load(_f)["cases"]


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_transformers_5_rope_parameters_read_as_read_hf_config_reads_them(tmp_path, case):
    """The config.json transformers 5's save_pretrained writes keeps rope_theta and the scaling
    in rope_parameters: from_hf_dict and from_hf_json read them (they read the base 10000,
    unscaled: another model), as read_hf_config does."""
    saved = ROPE_CASES[case]["saved_config"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    expected = read_hf_config(tmp_path)
    assert expected.rope_scaling is not None
    assert ModelConfig.from_hf_json(tmp_path) == expected
    assert ModelConfig.from_hf_dict(saved, source=str(tmp_path / "config.json")) == expected


def test_gemma3_rope_parameters_per_layer_type():
    """Gemma 3's rope_parameters hold one object a layer type: the full layers' is the model's
    RoPE (scaled here), the sliding layers' their own base."""
    fields = _config(
        model_type="gemma3_text",
        layer_types=None,
        rope_theta=None,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    config = ModelConfig.from_hf_dict(fields)
    assert (config.rope_theta, config.local_rope_theta) == (1e6, 1e4)
    assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ("linear", 8.0)


@pytest.mark.parametrize(
    ("rope_parameters", "field"),
    [
        ({"rope_type": "default", "rope_theta": 0}, "rope_parameters.rope_theta"),
        ({**LLAMA3, "rope_theta": 5e5, "low_freq_factor": "1"}, "rope_parameters"),
        (
            {"full_attention": {"rope_type": "default"}, "sliding_attention": ["default"]},
            "rope_parameters.sliding_attention",
        ),
        (
            {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_theta": "x"}},
            "rope_parameters.sliding_attention.rope_theta",
        ),
        (
            {"full_attention": {"rope_type": "dynamic", "factor": 2.0}},
            "rope_parameters.full_attention.rope_type",
        ),
        ("default", "rope_parameters"),
    ],
)
def test_rope_parameters_refusals_name_the_field_the_file_sets(rope_parameters, field):
    model = {"model_type": "gemma3_text", "layer_types": None}
    fields = _config(**model, rope_theta=None, rope_parameters=rope_parameters)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict(fields, source=SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: field '{field}'"), message
    assert "expected" in message, message

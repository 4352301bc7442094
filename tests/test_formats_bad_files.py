"""Malformed HF checkpoints and PEFT adapters: each is refused with jaxlora's own error, naming
the file, the field or tensor and what was expected, never a bare TypeError / ValueError /
UnicodeDecodeError / re.error from inside json, re or numpy, and never loaded half-wrong."""

import json
import math
import os
import struct

import numpy as np
import pytest
from peft_util import peft_tensor_prefix, random_params, write_random_peft_adapter
from safetensors.numpy import load_file, save_file

from configs.models import TINY
from jaxlora.errors import ConfigError, FormatError
from jaxlora.formats import _safetensors as safetensors_io
from jaxlora.formats import load_hf_checkpoint, load_peft_adapter, save_hf_checkpoint
from jaxlora.formats.hf import read_generation_defaults, read_hf_config

MAX_RANK = 16
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A valid tiny HF checkpoint directory (copied by each test that breaks it)."""
    directory = tmp_path_factory.mktemp("tiny-hf")
    save_hf_checkpoint(directory, TINY, random_params(TINY, seed=1))
    return directory


def _copy(checkpoint, tmp_path):
    for name in os.listdir(checkpoint):
        with open(checkpoint / name, "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    return tmp_path


def _write_header(path, header: dict, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)


# ---------------------------------------------------------------------------------------------
# safetensors headers


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]},  # was TypeError: unhashable
        {"dtype": "F32", "shape": [4], "data_offsets": ["0", 16]},  # was TypeError: '<='
        {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]},  # was accepted
        {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},  # was accepted as 4 values
        {"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]},  # was read as shape [4]
        {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},  # was read as shape [4]
        {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},  # was read as [1, 4]
    ],
)
def test_safetensors_header_entry_of_the_wrong_types_is_a_format_error(tmp_path, entry):
    path = str(tmp_path / "x.safetensors")
    _write_header(path, {"t": entry}, 16)
    with pytest.raises(FormatError) as info:
        safetensors_io.read_header(path)
    assert str(info.value).startswith(f"{path}: tensor 't' has a malformed header entry")
    assert "data_offsets" in str(info.value)


# ---------------------------------------------------------------------------------------------
# HF checkpoints: shards and the index


def test_index_that_is_not_utf8_is_a_format_error(checkpoint, tmp_path):
    """Was a bare UnicodeDecodeError."""
    d = _copy(checkpoint, tmp_path)
    os.remove(d / WEIGHTS)
    (d / INDEX).write_bytes(b'{"weight_map": {"model.norm.weight": "\xff.safetensors"}}')
    with pytest.raises(FormatError, match=rf"^{d / INDEX}: not a valid safetensors index"):
        load_hf_checkpoint(d)


def _shard(checkpoint, tmp_path, *, duplicate: str | None = None):
    """The checkpoint split in two shards (+ index); `duplicate` also in the second shard."""
    d = _copy(checkpoint, tmp_path)
    tensors = load_file(d / WEIGHTS)
    os.remove(d / WEIGHTS)
    names = sorted(tensors)
    first, second = names[::2], names[1::2]
    save_file({n: tensors[n] for n in first}, d / "a.safetensors")
    extra = {duplicate: tensors[duplicate] + 1} if duplicate else {}
    save_file({**{n: tensors[n] for n in second}, **extra}, d / "b.safetensors")
    weight_map = {**dict.fromkeys(first, "a.safetensors"), **dict.fromkeys(second, "b.safetensors")}
    (d / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return d, first


def test_tensor_in_two_shards_is_refused(checkpoint, tmp_path):
    """Was loaded from the shard the index names, the other copy ignored (vLLM and
    transformers read every shard whole: which copy they serve is an accident of order)."""
    d, first = _shard(checkpoint, tmp_path, duplicate=None)
    load_hf_checkpoint(d)
    d, first = _shard(checkpoint, tmp_path, duplicate=first[0])
    with pytest.raises(FormatError) as info:
        load_hf_checkpoint(d)
    message = str(info.value)
    for fragment in (str(d / "a.safetensors"), str(d / "b.safetensors"), repr(first[0])):
        assert fragment in message, (fragment, message)


def test_index_naming_a_missing_shard_says_where_it_was_named(checkpoint, tmp_path):
    """Was "<dir>/b.safetensors: file not found", with no word of the index naming it."""
    d, first = _shard(checkpoint, tmp_path)
    os.remove(d / "b.safetensors")
    with pytest.raises(FormatError) as info:
        load_hf_checkpoint(d)
    message = str(info.value)
    assert message.startswith(f"{d / INDEX}: weight_map names shard 'b.safetensors'")
    assert "not found" in message


# ---------------------------------------------------------------------------------------------
# HF checkpoints: config.json


def _config_dir(checkpoint, tmp_path, text: str):
    d = _copy(checkpoint, tmp_path)
    (d / "config.json").write_text(text)
    return d


def _with(checkpoint, **changes) -> str:
    with open(checkpoint / "config.json") as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return json.dumps(config)


NAN = float("nan")
CONFIG_BREAKAGES = {
    # (changes to config.json, the field the message names); comments: what happened before
    "heads_a_string": ({"num_attention_heads": "4", "head_dim": None}, "num_attention_heads"),
    "heads_zero": ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    "model_type_a_list": ({"model_type": ["llama"]}, "model_type"),  # TypeError: unhashable
    "hidden_act_a_list": ({"hidden_act": ["silu"]}, "hidden_act"),  # TypeError: unhashable
    "layer_types_an_int": ({"layer_types": 2}, "layer_types"),  # TypeError: not iterable
    "layers_a_float": ({"num_hidden_layers": 2.0}, "num_hidden_layers"),  # file unnamed
    "rope_theta_zero": ({"rope_theta": 0}, "rope_theta"),  # loaded: inf frequencies
    "rope_theta_negative": ({"rope_theta": -10000.0}, "rope_theta"),  # loaded: NaN frequencies
    "rope_theta_nan": ({"rope_theta": NAN}, "rope_theta"),  # loaded
    "rms_norm_eps_negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),  # loaded: NaN norms
    "rms_norm_eps_inf": ({"rms_norm_eps": math.inf}, "rms_norm_eps"),  # loaded
    "llama3_low_freq_factor_a_string": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": "1",
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
        "rope_scaling",  # (and rope scaling field 'low_freq_factor')
    ),  # loaded; a TypeError deep in the RoPE table when the model is built
    "gemma3_local_rope_a_string": (
        {"model_type": "gemma3_text", "rope_local_base_freq": "x"},
        "rope_local_base_freq",
    ),  # ValueError: could not convert string to float
    "gemma3_sliding_rope_parameters_a_list": (
        {
            "model_type": "gemma3_text",
            "rope_parameters": {
                "full_attention": {"rope_type": "default"},
                "sliding_attention": ["default"],
            },
        },
        "rope_parameters.sliding_attention",
    ),  # AttributeError: 'list' object has no attribute 'get'
    "quantized": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "quantization_config",
    ),  # was "missing tensor 'model.layers.0.self_attn.q_proj.weight'" (it holds qweight)
}


@pytest.mark.parametrize("breakage", sorted(CONFIG_BREAKAGES))
def test_config_json_refusals_name_the_file_and_the_field(checkpoint, tmp_path, breakage):
    changes, field = CONFIG_BREAKAGES[breakage]
    d = _config_dir(checkpoint, tmp_path, _with(checkpoint, **changes))
    with pytest.raises(ConfigError) as info:
        load_hf_checkpoint(d)
    message = str(info.value)
    assert message.startswith(f"{d / 'config.json'}: "), message
    assert f"'{field}'" in message, message
    assert "expected" in message, message


def test_model_config_errors_name_the_config_file(checkpoint, tmp_path):
    """ModelConfig's own checks (here: heads that kv heads do not divide) said "model config
    field ..." without the file."""
    d = _config_dir(checkpoint, tmp_path, _with(checkpoint, num_key_value_heads=3))
    with pytest.raises(ConfigError, match=rf"^{d / 'config.json'}: .*num_kv_heads \(3\)"):
        read_hf_config(d)


# ---------------------------------------------------------------------------------------------
# HF checkpoints: weights


def test_nan_or_inf_base_weights_are_refused_like_an_adapter_s(checkpoint, tmp_path):
    """Were loaded (every logit NaN where they are read); adapters' are refused already."""
    d = _copy(checkpoint, tmp_path)
    tensors = load_file(d / WEIGHTS)
    tensors["model.layers.1.mlp.down_proj.weight"][5, 7] = np.nan
    tensors["model.layers.1.mlp.down_proj.weight"][6, 7] = -np.inf
    save_file(tensors, d / WEIGHTS)
    with pytest.raises(FormatError) as info:
        load_hf_checkpoint(d)
    assert str(info.value) == (
        f"{d / WEIGHTS}: tensor 'model.layers.1.mlp.down_proj.weight' holds 2 NaN or infinite "
        "values; expected finite weights"
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_all_finite_finds_each_kind_of_non_finite_value_anywhere(dtype):
    """all_finite reads the 16-bit floats' exponent bits and the others with np.isfinite, chunk
    by chunk: every kind of non-finite value is found wherever it is (past the first chunk, in
    a view that is not contiguous), and the largest finite values are not taken for one."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    size = 3 * safetensors_io._FINITE_CHUNK + 5
    largest = ml_dtypes.finfo(dtype).max
    finite = np.full(size, largest, dtype)
    finite[1::2] = -largest
    assert safetensors_io.all_finite(finite)
    assert safetensors_io.all_finite(finite.reshape(-1, 1)[::2])
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, safetensors_io._FINITE_CHUNK + 1, size - 1):
            values = finite.copy()
            values[where] = bad
            assert not safetensors_io.all_finite(values), (bad, where)
        strided = np.zeros((size, 2), dtype)
        strided[-1, 0] = bad
        assert not safetensors_io.all_finite(strided[:, 0])


def test_weights_beyond_the_served_dtype_are_refused_not_made_infinite(checkpoint, tmp_path):
    """An F64 weight past float32's range became inf in the float32 params, silently."""
    d = _copy(checkpoint, tmp_path)
    tensors = load_file(d / WEIGHTS)
    norm = tensors["model.norm.weight"].astype(np.float64)
    norm[3] = 1e300
    tensors["model.norm.weight"] = norm
    save_file(tensors, d / WEIGHTS)
    with pytest.raises(FormatError) as info:
        load_hf_checkpoint(d, dtype=np.float32)
    message = str(info.value)
    assert message.startswith(
        f"{d / WEIGHTS}: tensor 'model.norm.weight' holds values up to 1e+300"
    )
    assert "float32" in message


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", "Infinity"), ("repetition_penalty", "Infinity")]
)
def test_generation_config_infinite_default_is_refused(tmp_path, field, value):
    """Was read as the default, then every request that left it out failed with a
    RequestError that did not name generation_config.json."""
    (tmp_path / "generation_config.json").write_text(f'{{"{field}": {value}}}')
    with pytest.raises(FormatError, match=rf"generation_config.json: field '{field}'"):
        read_generation_defaults(tmp_path)


# ---------------------------------------------------------------------------------------------
# PEFT adapters


def _adapter(tmp_path):
    return write_random_peft_adapter(tmp_path / "a", TINY, rank=4, target_modules=["q_proj"])


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_valid_alone_but_not_as_peft_matches_it_is_refused(tmp_path, field):
    """PEFT matches a pattern key as (.*\\.)?(key)$: "(?i)q_proj" compiles alone but not there
    (inline flags must start the expression). Was a bare re.error."""
    d = _adapter(tmp_path)
    with open(os.path.join(d, "adapter_config.json")) as f:
        config = json.load(f)
    config[field] = {"(?i)q_proj": 4}
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(FormatError, match=rf"adapter_config.json: {field} key '\(\?i\)q_proj'"):
        load_peft_adapter(d, TINY, max_rank=MAX_RANK)


def test_adapter_weights_beyond_float32_are_refused_not_made_infinite(tmp_path):
    """An F64 lora_A past float32's range passed the NaN check (finite in float64), then
    became inf in the float32 rank-rows."""
    d = _adapter(tmp_path)
    path = os.path.join(d, "adapter_model.safetensors")
    tensors = load_file(path)
    name = f"{peft_tensor_prefix(1, 'q_proj')}.lora_A.weight"
    a = tensors[name].astype(np.float64)
    a[2, 3] = -1e300
    tensors[name] = a
    save_file(tensors, path)
    with pytest.raises(FormatError) as info:
        load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    assert str(info.value).startswith(f"{path}: tensor '{name}' holds values up to 1e+300")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": 1e308}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": -1e300}}, "alpha_pattern['q_proj']"),
    ],
)
def test_alpha_whose_scale_overflows_float32_is_refused(tmp_path, changes, field):
    """lora_alpha / r finite in float64 but past float32's range: the kernels' float32 scale
    table held inf (every output of the adapter inf or NaN)."""
    d = _adapter(tmp_path)
    config_path = os.path.join(d, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, **changes}, f)
    with pytest.raises(FormatError) as info:
        load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    message = str(info.value)
    assert message.startswith(f"{config_path}: field {field} is "), message
    assert "float32" in message


@pytest.mark.parametrize(
    "text", ['{"hidden_size": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000]
)
def test_config_json_python_cannot_parse_is_a_config_error(tmp_path, text):
    """An int of more digits than Python converts, or nesting past its recursion limit: a
    ValueError / RecursionError from inside json before."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json: not a usable JSON document"):
        read_hf_config(tmp_path)

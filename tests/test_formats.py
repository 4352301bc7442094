"""HF checkpoints, PEFT adapters and orbax params checkpoints: loading, writing and refusals."""

import dataclasses
import json
import os

import numpy as np
import pytest
from peft_util import peft_tensor_prefix, random_params, write_random_peft_adapter
from safetensors.numpy import load_file, save_file

from configs.models import TINY
from jaxlora.config import RopeScaling
from jaxlora.errors import AdapterError, ConfigError, FormatError, JaxloraError
from jaxlora.formats import _safetensors as safetensors_io
from jaxlora.formats import (
    load_hf_checkpoint,
    load_peft_adapter,
    read_peft_adapter_spec,
    restore_params,
    save_hf_checkpoint,
    save_params,
    save_peft_adapter,
)
from jaxlora.lora import LoraWeights
from pallas_kernels.layout import MODULES

MAX_RANK = 16


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}/{k}" if prefix else k))
        return out
    return {prefix: np.asarray(tree)}


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def rewrite_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def rewrite_tensors(directory, filename="adapter_model.safetensors", *, drop=(), add=None):
    path = os.path.join(directory, filename)
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def write_adapter(directory, config, adapter_config, layer_ranks, seed=0):
    """A PEFT directory with the given config and tensors of the given (layer, module) ranks."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = config.module_shapes()
    tensors = {}
    for (layer, module), rank in layer_ranks.items():
        fan_in, fan_out = shapes[module]
        prefix = peft_tensor_prefix(layer, module)
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(np.float32)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "bias": "none", **adapter_config}, f)
    return directory


def peft_delta(directory, layer, module, scale):
    """scale * A^T B^T from the PEFT tensors: the (in, out) update PEFT adds to x @ W^T."""
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    prefix = peft_tensor_prefix(layer, module)
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    return scale * a.T.astype(np.float64) @ b.T.astype(np.float64)


def jaxlora_delta(weights: LoraWeights, layer, module):
    a, b = weights.a[module][layer], weights.b[module][layer]
    return weights.scales[module] * a.T.astype(np.float64) @ b.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# HF checkpoints


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY, seed=1)


def test_hf_round_trip_is_exact_and_in_hf_layout(tmp_path, tiny_params):
    from jaxlora.model import fuse_projections

    # the engine's fused projections (LLM.params) are written in the HF layout too
    save_hf_checkpoint(tmp_path / "fused", TINY, fuse_projections(tiny_params))
    save_hf_checkpoint(tmp_path, TINY, tiny_params)
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    fused_stored = load_file(os.path.join(tmp_path, "fused", "model.safetensors"))
    assert fused_stored.keys() == stored.keys()
    for name, tensor in stored.items():
        np.testing.assert_array_equal(fused_stored[name], tensor, err_msg=name)
    # HF stores Linear weights (out, in): the transpose of the kernel, per layer.
    np.testing.assert_array_equal(
        stored["model.layers.1.self_attn.k_proj.weight"],
        tiny_params["layers"]["attn"]["k_proj"]["kernel"][1].T,
    )
    np.testing.assert_array_equal(stored["lm_head.weight"], tiny_params["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(
        stored["model.layers.0.input_layernorm.weight"],
        tiny_params["layers"]["input_layernorm"]["scale"][0],
    )
    assert len(stored) == 3 + 9 * TINY.num_layers
    config, params = load_hf_checkpoint(tmp_path)
    assert config == TINY
    assert_trees_equal(params, tiny_params)
    assert all(v.dtype == np.float32 for v in flat(params).values())


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_hf_load_copies_weights_tile_by_tile_on_workers_exactly(tmp_path, model_type):
    """load_hf_checkpoint copies transposed weights tile by tile (256 x 256) on worker threads:
    widths beyond one tile and no multiple of it (hidden 288, intermediate 600, vocab 300),
    Phi-3's fused q|k|v and gate|up split by columns, one worker or several, float32 or
    bfloat16: the params as saved; a NaN in one tensor is still refused by name."""
    import ml_dtypes

    config = dataclasses.replace(
        TINY,
        model_type=model_type,
        vocab_size=300,
        hidden_size=288,
        intermediate_size=600,
        num_heads=4,
        num_kv_heads=2,
        head_dim=72,
    )
    params = random_params(config, seed=3)
    save_hf_checkpoint(tmp_path, config, params)
    for workers in (1, 3, None):
        loaded_config, loaded = load_hf_checkpoint(tmp_path, workers=workers)
        assert loaded_config == config
        assert_trees_equal(loaded, params)
    _, bf16 = load_hf_checkpoint(tmp_path, dtype=ml_dtypes.bfloat16, workers=2)
    for key, value in flat(params).items():
        np.testing.assert_array_equal(
            flat(bf16)[key], value.astype(ml_dtypes.bfloat16), err_msg=key
        )
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    stored[name][3, 290] = np.nan
    save_file(stored, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"tensor '{name}' holds 1 NaN or infinite"):
        load_hf_checkpoint(tmp_path, workers=3)


def test_hf_tied_embeddings_have_no_lm_head(tmp_path):
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    params = random_params(tied)
    assert "lm_head" not in params
    save_hf_checkpoint(tmp_path, tied, params)
    assert "lm_head.weight" not in load_file(os.path.join(tmp_path, "model.safetensors"))
    # Some exporters also write the (identical) lm_head of a tied model: it is not a second head.
    rewrite_tensors(
        tmp_path, "model.safetensors", add={"lm_head.weight": params["embed_tokens"]["embedding"]}
    )
    config, loaded = load_hf_checkpoint(tmp_path)
    assert config.tie_word_embeddings and "lm_head" not in loaded
    assert_trees_equal(loaded, params)
    # Another head is refused: tied, it would answer with other logits than transformers 5,
    # which serves that head.
    other = params["embed_tokens"]["embedding"].copy()
    other[3, 5] += 1.0
    rewrite_tensors(tmp_path, "model.safetensors", add={"lm_head.weight": other})
    with pytest.raises(FormatError) as info:
        load_hf_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{os.path.join(tmp_path, 'model.safetensors')}: tensor 'lm_head.weight' differs from "
        "'model.embed_tokens.weight' while config.json sets tie_word_embeddings true: expected "
        "no lm_head.weight or a copy of the embeddings (set tie_word_embeddings false in "
        "config.json to serve this head)"
    )


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2"])
def test_hf_config_without_tie_word_embeddings_takes_transformers_default(model_type):
    """transformers' Gemma configs tie the LM head to the embeddings by default (and the 4.x
    ones left the field out where it was that), Llama's do not."""
    from jaxlora.config import ModelConfig

    fields = TINY.to_hf_dict() | {"model_type": model_type}
    if model_type == "gemma2":
        fields |= {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}
    del fields["tie_word_embeddings"]
    config = ModelConfig.from_hf_dict(fields, source="config.json")
    assert config.tie_word_embeddings == (model_type != "llama")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rms_norm_eps", None, "a number"),
        ("rope_theta", None, "a number"),
        ("rope_theta", "1e4", "a number"),
        ("max_position_embeddings", None, "an int"),
        ("max_position_embeddings", "big", "an int"),
        ("max_position_embeddings", 4096.0, "an int"),
        ("tie_word_embeddings", "false", "a bool"),
        ("tie_word_embeddings", 0, "a bool"),
    ],
)
def test_hf_config_fields_of_the_wrong_type_are_refused_by_name(field, value, expected):
    """Was a bare TypeError / ValueError, and "false" a true tie_word_embeddings."""
    from jaxlora.config import ModelConfig

    fields = TINY.to_hf_dict() | {field: value}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict(fields, source="/m/config.json")
    assert str(info.value) == (f"/m/config.json: field {field!r} is {value!r}; expected {expected}")


def test_hf_sharded_checkpoint(tmp_path, tiny_params):
    save_hf_checkpoint(tmp_path, TINY, tiny_params)
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    os.remove(os.path.join(tmp_path, "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, os.path.join(tmp_path, shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    with open(os.path.join(tmp_path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _, params = load_hf_checkpoint(tmp_path)
    assert_trees_equal(params, tiny_params)


def test_hf_bf16_checkpoint_is_converted_to_the_requested_dtype(tmp_path, tiny_params):
    import ml_dtypes

    bf16 = _map(tiny_params, lambda x: x.astype(ml_dtypes.bfloat16))
    save_hf_checkpoint(tmp_path, TINY, bf16)
    _, params = load_hf_checkpoint(tmp_path, dtype=np.float32)
    expected = _map(bf16, lambda x: x.astype(np.float32))
    assert_trees_equal(params, expected)
    _, params16 = load_hf_checkpoint(tmp_path, dtype=ml_dtypes.bfloat16)
    assert params16["norm"]["scale"].dtype == ml_dtypes.bfloat16


def _map(tree, fn):
    return {k: _map(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def test_hf_config_of_transformers_5_with_rope_parameters(tmp_path, tiny_params):
    save_hf_checkpoint(tmp_path, TINY, tiny_params)
    path = os.path.join(tmp_path, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    with open(path, "w") as f:
        json.dump(cfg, f)
    config, _ = load_hf_checkpoint(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


ROPE_TABLE = os.path.join(os.path.dirname(__file__), "fixtures", "rope_hf.json")
with open(ROPE_TABLE) as _f:
    ROPE_CASES = json.load(_f)["cases"]
# Each case's longest context (ModelConfig.context_length): yarn's original x factor, linear's
# max_position_embeddings x factor, llama3's max_position_embeddings (vLLM's max_model_len rule).
ROPE_CONTEXTS = {
    "llama3_8b": 131072,
    "linear_x2": 8192,
    "qwen2.5_yarn_x4": 131072,
    "qwen3_yarn_x4": 131072,
    "yarn_mscale": 163840,
    "yarn_untruncated_own_attention_factor": 65536,
    "yarn_top_level_original": 32768,
}


@pytest.mark.parametrize("form", ["config", "saved_config"])
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_is_transformers_own(tmp_path, case, form):
    """llama3, linear and yarn (with DeepSeek's mscale pair, its own attention factor, an
    untruncated correction range, Phi-3's top-level original length) read from the config.json
    a user writes (transformers 4's rope_scaling, the legacy "type" key once) and from the one
    save_pretrained writes (transformers 5's rope_parameters): the inverse frequencies and the
    cos / sin scale transformers 5.17 computes (tests/fixtures/rope_hf.json, written by
    scripts/make_golden.py --rope_table)."""
    from jaxlora.formats.hf import read_hf_config
    from jaxlora.model import rope_inverse_frequencies

    entry = ROPE_CASES[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(entry[form]))
    config = read_hf_config(path)
    assert config.model_type == entry["config"]["model_type"]
    np.testing.assert_allclose(
        np.asarray(rope_inverse_frequencies(config), np.float64), entry["inv_freq"], rtol=2e-6
    )
    assert config.rope_scaling.attention_scaling == pytest.approx(
        entry["attention_scaling"], rel=1e-12
    )
    assert config.context_length == ROPE_CONTEXTS[case]
    # What jaxlora writes back reads as the same model.
    written = dataclasses.replace(config, name=config.model_type)
    assert type(config).from_hf_dict(config.to_hf_dict()) == written


def test_rope_scaling_refusals_name_the_field():
    from jaxlora.config import ModelConfig

    base = ROPE_CASES["qwen3_yarn_x4"]["config"]

    def read(**scaling):
        return ModelConfig.from_hf_dict({**base, "rope_scaling": scaling}, source="c.json")

    for rope_type in ("dynamic", "longrope"):
        with pytest.raises(ConfigError, match=rf"c\.json: .*'{rope_type}'.*cannot follow"):
            read(rope_type=rope_type, factor=2.0)
    with pytest.raises(ConfigError, match=r"c\.json: .*'mrope'; expected one of"):
        read(rope_type="mrope", factor=2.0)
    with pytest.raises(ConfigError, match=r"c\.json: field 'rope_scaling.factor' is missing"):
        read(rope_type="yarn", original_max_position_embeddings=4096)
    with pytest.raises(ConfigError, match=r"c\.json: .*'factor': expected a positive number"):
        read(rope_type="linear", factor="2")
    with pytest.raises(ConfigError, match=r"c\.json: .*'factor': expected >= 1 for yarn"):
        read(rope_type="yarn", factor=0.5)
    with pytest.raises(ConfigError, match=r"c\.json: .*'attention_factor': expected None or"):
        read(rope_type="yarn", factor=4.0, attention_factor=0)
    with pytest.raises(ConfigError, match=r"c\.json: .*'original_max_position_embeddings'"):
        read(rope_type="yarn", factor=4.0, original_max_position_embeddings=-1)
    with pytest.raises(ConfigError, match=r"c\.json: field 'rope_scaling' is 'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": "yarn"}, source="c.json")
    # "default" is no scaling.
    assert read(rope_type="default").rope_scaling is None


def _hf_dir(tmp_path, params):
    save_hf_checkpoint(tmp_path, TINY, params)
    return str(tmp_path)


def _truncate(path, keep):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])


HF_BREAKAGES = {
    "missing_tensor": (
        lambda d: rewrite_tensors(
            d, "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"]
        ),
        FormatError,
        ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "[128, 64]"],
    ),
    "wrong_shape": (
        lambda d: rewrite_tensors(
            d,
            "model.safetensors",
            add={"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)},
        ),
        FormatError,
        ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[32, 64]"],
    ),
    "unexpected_tensor": (
        lambda d: rewrite_tensors(
            d,
            "model.safetensors",
            add={"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)},
        ),
        FormatError,
        ["model.safetensors", "model.layers.2.mlp.up_proj.weight", "unexpected"],
    ),
    "integer_dtype": (
        lambda d: rewrite_tensors(
            d, "model.safetensors", add={"model.norm.weight": np.zeros((64,), np.int32)}
        ),
        FormatError,
        ["model.norm.weight", "I32"],
    ),
    "pickle_only": (
        lambda d: (
            os.remove(os.path.join(d, "model.safetensors")),
            open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04junk"),
        ),
        FormatError,
        ["pytorch_model.bin", "pickle", "safetensors"],
    ),
    "truncated": (
        lambda d: _truncate(os.path.join(d, "model.safetensors"), 50_000),
        FormatError,
        ["model.safetensors", "truncated"],
    ),
    "garbage_header": (
        lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(
            (20).to_bytes(8, "little") + b"{not json at all...." + b"\0" * 64
        ),
        FormatError,
        ["model.safetensors", "JSON"],
    ),
    "index_names_missing_shard": (
        lambda d: (
            os.remove(os.path.join(d, "model.safetensors")),
            json.dump(
                {"weight_map": {"model.norm.weight": "model-00001.safetensors"}},
                open(os.path.join(d, "model.safetensors.index.json"), "w"),
            ),
        ),
        FormatError,
        ["model-00001.safetensors", "not found"],
    ),
    "missing_config": (
        lambda d: os.remove(os.path.join(d, "config.json")),
        ConfigError,
        ["config.json", "not found"],
    ),
}


@pytest.mark.parametrize("breakage", sorted(HF_BREAKAGES))
def test_hf_checkpoint_refusals_name_file_tensor_and_expectation(tmp_path, tiny_params, breakage):
    directory = _hf_dir(tmp_path, tiny_params)
    corrupt, error, fragments = HF_BREAKAGES[breakage]
    corrupt(directory)
    with pytest.raises(error) as info:
        load_hf_checkpoint(directory)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_hf_path_to_a_pickle_file_is_refused_unopened(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(b"\x80\x04never read")
    with pytest.raises(FormatError, match="pickle"):
        load_hf_checkpoint(path)


def test_save_hf_checkpoint_refuses_params_of_another_shape(tmp_path, tiny_params):
    bad = _map(tiny_params, np.copy)
    bad["layers"]["attn"]["q_proj"]["kernel"] = np.zeros((2, 64, 32), np.float32)
    with pytest.raises(
        FormatError,
        match=r"params\['layers'\]\['attn'\]\['q_proj'\]\['kernel'\] has shape "
        r"\(2, 64, 32\); expected \(2, 64, 64\)",
    ):
        save_hf_checkpoint(tmp_path, TINY, bad)
    bad["layers"]["attn"]["q_proj"]["kernel"] = tiny_params["layers"]["attn"]["q_proj"]["kernel"]
    del bad["lm_head"]
    with pytest.raises(FormatError, match="lm_head"):
        save_hf_checkpoint(tmp_path, TINY, bad)


# ---------------------------------------------------------------------------------------------
# PEFT adapters


def test_peft_adapter_loads_as_rank_rows(tmp_path):
    d = write_random_peft_adapter(
        tmp_path / "a", TINY, rank=4, target_modules=["q_proj", "v_proj", "down_proj"], alpha=12
    )
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert set(weights.a) == {"q_proj", "v_proj", "down_proj"}
    for layer in range(TINY.num_layers):
        prefix = peft_tensor_prefix(layer, "v_proj")
        np.testing.assert_array_equal(
            weights.a["v_proj"][layer], tensors[f"{prefix}.lora_A.weight"]
        )
        np.testing.assert_array_equal(
            weights.b["v_proj"][layer], tensors[f"{prefix}.lora_B.weight"].T
        )
    assert weights.a["down_proj"].shape == (2, 4, 128)
    assert weights.b["down_proj"].shape == (2, 4, 64)
    assert weights.scales == {m: 3.0 for m in weights.a}
    assert weights.name == "a" and weights.source == str(d)


def test_rslora_scale_is_alpha_over_sqrt_rank(tmp_path):
    d = write_random_peft_adapter(
        tmp_path / "a", TINY, rank=16, target_modules=["o_proj"], alpha=8, use_rslora=True
    )
    assert load_peft_adapter(d, TINY, max_rank=MAX_RANK).scales == {"o_proj": 2.0}


def test_spec_matches_the_loaded_weights(tmp_path):
    d = write_random_peft_adapter(
        tmp_path / "a", TINY, rank=8, target_modules=["k_proj", "up_proj"]
    )
    spec = read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK, name="custom")
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK, name="custom")
    assert spec.name == weights.name == "custom"
    assert spec.target_modules == ("k_proj", "up_proj")
    assert spec.ranks == weights.ranks == {"k_proj": 8, "up_proj": 8}
    assert spec.scales == weights.scales == {"k_proj": 2.0, "up_proj": 2.0}
    assert spec.nbytes == weights.nbytes == 2 * 8 * ((64 + 32) + (64 + 128)) * 4
    assert spec.max_rank == 8 and spec.path == str(d)


def test_spec_reads_only_the_header(tmp_path, monkeypatch):
    d = write_random_peft_adapter(tmp_path / "a", TINY, rank=4, target_modules=["q_proj"])
    # Overwrite the tensor data (not the header) with garbage: the spec cannot notice.
    path = os.path.join(d, "adapter_model.safetensors")
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        size = os.path.getsize(path) - 8 - header_len
        f.write(b"\xff" * size)

    def no_weight_reads(*args, **kwargs):
        raise AssertionError("read_peft_adapter_spec read tensor data")

    monkeypatch.setattr(safetensors_io, "read_tensors", no_weight_reads)
    monkeypatch.setattr(safetensors_io, "safe_open", no_weight_reads)
    spec = read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK)
    assert spec.ranks == {"q_proj": 4}


def test_rank_and_alpha_patterns_per_module_and_per_layer(tmp_path):
    adapter_config = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        # PEFT matches pattern keys against the end of the full module name, first key wins.
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 4, "v_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 24},
    }
    ranks = {(0, "q_proj"): 4, (1, "q_proj"): 8, (0, "v_proj"): 2, (1, "v_proj"): 2}
    d = write_adapter(tmp_path / "p", TINY, adapter_config, ranks)
    spec = read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK)
    assert spec.layer_ranks == {"q_proj": (4, 8), "v_proj": (2, 2)}
    assert spec.layer_scales == {"q_proj": (16 / 4, 24 / 8), "v_proj": (8.0, 8.0)}
    assert spec.ranks == {"q_proj": 8, "v_proj": 2}
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    assert weights.a["q_proj"].shape == (2, 8, 64)
    # Layer 0 of q has rank 4: rows 4..7 are padding, zero in A and B.
    assert not weights.a["q_proj"][0, 4:].any() and not weights.b["q_proj"][0, 4:].any()
    for (layer, module), _ in ranks.items():
        np.testing.assert_allclose(
            jaxlora_delta(weights, layer, module),
            peft_delta(d, layer, module, spec.layer_scales[module][layer]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_zero_alpha_in_the_first_layer_does_not_zero_the_module(tmp_path):
    adapter_config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["up_proj"],
        "alpha_pattern": {"model.layers.0.mlp.up_proj": 0},
    }
    d = write_adapter(tmp_path / "z", TINY, adapter_config, {(0, "up_proj"): 4, (1, "up_proj"): 4})
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    assert weights.scales == {"up_proj": 2.0}
    assert not weights.b["up_proj"][0].any()
    np.testing.assert_allclose(
        jaxlora_delta(weights, 1, "up_proj"), peft_delta(d, 1, "up_proj", 2.0), rtol=1e-5, atol=1e-5
    )


def test_layers_to_transform_leaves_other_layers_untouched(tmp_path):
    adapter_config = {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["k_proj", "gate_proj"],
        "layers_to_transform": [1],
    }
    d = write_adapter(tmp_path / "l", TINY, adapter_config, {(1, "k_proj"): 4, (1, "gate_proj"): 4})
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    for m in ("k_proj", "gate_proj"):
        assert not weights.a[m][0].any() and not weights.b[m][0].any()
        np.testing.assert_allclose(
            jaxlora_delta(weights, 1, m), peft_delta(d, 1, m, 1.0), rtol=1e-5, atol=1e-5
        )
    # The same adapter with a tensor for the untransformed layer 0 is inconsistent.
    write_adapter(
        tmp_path / "l0",
        TINY,
        adapter_config,
        {(0, "k_proj"): 4, (1, "k_proj"): 4, (1, "gate_proj"): 4},
    )
    with pytest.raises(FormatError, match=r"layers\.0\.self_attn\.k_proj.*not selected"):
        read_peft_adapter_spec(tmp_path / "l0", TINY, max_rank=MAX_RANK)


ALL_LAYERS = (0, 1)


@pytest.mark.parametrize(
    "target_modules, extra, expected",
    [
        (r".*\.(q_proj|down_proj)", {}, {"q_proj": ALL_LAYERS, "down_proj": ALL_LAYERS}),
        ("all-linear", {}, {m: ALL_LAYERS for m in MODULES}),
        (None, {}, {"q_proj": ALL_LAYERS, "v_proj": ALL_LAYERS}),  # PEFT's default for Llama
        (["model.layers.1.mlp.up_proj"], {}, {"up_proj": (1,)}),
        (["self_attn.o_proj"], {"layers_to_transform": 0}, {"o_proj": (0,)}),
        (
            "all-linear",
            {"exclude_modules": ["down_proj", "model.layers.0.self_attn.q_proj"]},
            {**{m: ALL_LAYERS for m in MODULES if m != "down_proj"}, "q_proj": (1,)},
        ),
        (
            ["q_proj", "up_proj"],
            {"layers_to_transform": [0], "layers_pattern": "layers"},
            {"q_proj": (0,), "up_proj": (0,)},
        ),
    ],
)
def test_target_module_forms(tmp_path, target_modules, extra, expected):
    ranks = {(layer, m): 2 for m, layers in expected.items() for layer in layers}
    d = write_adapter(
        tmp_path / "t",
        TINY,
        {"r": 2, "lora_alpha": 2, "target_modules": target_modules, **extra},
        ranks,
    )
    spec = read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK)
    assert spec.target_modules == tuple(m for m in MODULES if m in expected)
    for m, layers in expected.items():
        assert spec.layer_ranks[m] == tuple(2 if i in layers else 0 for i in ALL_LAYERS)


def test_adapter_name_inside_tensor_names_is_accepted(tmp_path):
    d = write_random_peft_adapter(tmp_path / "a", TINY, rank=2, target_modules=["q_proj"])
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, os.path.join(d, "adapter_model.safetensors"))
    weights = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    np.testing.assert_array_equal(
        weights.a["q_proj"][1], tensors[f"{peft_tensor_prefix(1, 'q_proj')}.lora_A.weight"]
    )


Q0 = peft_tensor_prefix(0, "q_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

PEFT_BREAKAGES = {
    # unsupported features (AdapterError)
    "dora": (lambda d: rewrite_config(d, use_dora=True), AdapterError, [CONFIG_FILE, "use_dora"]),
    "modules_to_save": (
        lambda d: rewrite_config(d, modules_to_save=["lm_head"]),
        AdapterError,
        [CONFIG_FILE, "modules_to_save"],
    ),
    "bias": (
        lambda d: rewrite_config(d, bias="lora_only"),
        AdapterError,
        [CONFIG_FILE, "'bias'", "'none'"],
    ),
    "lm_head": (
        lambda d: rewrite_config(d, target_modules=["q_proj", "lm_head"]),
        AdapterError,
        [CONFIG_FILE, "lm_head", "q_proj, k_proj"],
    ),
    "embed_tokens": (
        lambda d: rewrite_config(d, target_modules=".*embed_tokens"),
        AdapterError,
        [CONFIG_FILE, "embed_tokens"],
    ),
    "not_a_linear": (
        lambda d: rewrite_config(d, target_modules=["q_proj", "input_layernorm"]),
        AdapterError,
        [CONFIG_FILE, "input_layernorm", "not a LoRA-able linear"],
    ),
    "rank_above_max": (
        lambda d: rewrite_config(d, r=32),
        AdapterError,
        [CONFIG_FILE, "field r ", "rank 32", "max_rank=16"],
    ),
    "pattern_rank_above_max": (
        lambda d: rewrite_config(d, rank_pattern={"q_proj": 17}),
        AdapterError,
        [CONFIG_FILE, "rank_pattern['q_proj']", "max_rank=16"],
    ),
    "not_lora": (
        lambda d: rewrite_config(d, peft_type="IA3"),
        AdapterError,
        [CONFIG_FILE, "peft_type", "'LORA'"],
    ),
    "pissa_unconverted": (
        lambda d: rewrite_config(d, init_lora_weights="pissa_niter_4"),
        AdapterError,
        [CONFIG_FILE, "init_lora_weights"],
    ),
    "unknown_variant": (
        lambda d: rewrite_config(d, use_fancy_lora=True),
        AdapterError,
        [CONFIG_FILE, "use_fancy_lora"],
    ),
    "dora_tensor": (
        lambda d: rewrite_tensors(d, add={f"{Q0}.lora_magnitude_vector": np.ones(64, np.float32)}),
        AdapterError,
        [WEIGHTS_FILE, "lora_magnitude_vector", "DoRA"],
    ),
    "bias_tensor": (
        lambda d: rewrite_tensors(d, add={f"{Q0}.bias": np.ones(64, np.float32)}),
        AdapterError,
        [WEIGHTS_FILE, f"{Q0}.bias"],
    ),
    "embedding_lora_tensor": (
        lambda d: rewrite_tensors(
            d,
            add={
                "base_model.model.model.embed_tokens.lora_embedding_A": np.ones(
                    (4, 512), np.float32
                )
            },
        ),
        AdapterError,
        [WEIGHTS_FILE, "lora_embedding_A"],
    ),
    "saved_lm_head": (
        lambda d: rewrite_tensors(
            d, add={"base_model.model.lm_head.weight": np.ones((512, 64), np.float32)}
        ),
        AdapterError,
        [WEIGHTS_FILE, "base_model.model.lm_head.weight"],
    ),
    # files that do not match the model or are broken (FormatError)
    "unknown_module": (
        lambda d: rewrite_config(d, target_modules=["q_proj", "c_attn"]),
        FormatError,
        [CONFIG_FILE, "'c_attn'", "q_proj, k_proj"],
    ),
    "wrong_shape": (
        lambda d: rewrite_tensors(d, add={f"{Q0}.lora_B.weight": np.ones((32, 4), np.float32)}),
        FormatError,
        [WEIGHTS_FILE, f"{Q0}.lora_B.weight", "[32, 4]", "expected [64, 4]"],
    ),
    "missing_tensor": (
        lambda d: rewrite_tensors(d, drop=[f"{Q0}.lora_A.weight"]),
        FormatError,
        [WEIGHTS_FILE, f"{Q0}.lora_A.weight", "[4, 64]"],
    ),
    "unknown_key": (
        lambda d: rewrite_tensors(d, add={f"{Q0}.lora_C.weight": np.ones((4, 64), np.float32)}),
        FormatError,
        [WEIGHTS_FILE, f"{Q0}.lora_C.weight", "expected names like"],
    ),
    "tensor_of_untargeted_module": (
        lambda d: rewrite_tensors(
            d,
            add={f"{peft_tensor_prefix(0, 'k_proj')}.lora_A.weight": np.ones((4, 64), np.float32)},
        ),
        FormatError,
        [WEIGHTS_FILE, "k_proj.lora_A.weight", "not selected by target_modules"],
    ),
    "pickle_weights": (
        lambda d: (
            os.remove(os.path.join(d, WEIGHTS_FILE)),
            open(os.path.join(d, "adapter_model.bin"), "wb").write(b"\x80"),
        ),
        FormatError,
        ["adapter_model.bin", "pickle"],
    ),
    "pickle_disguised": (
        lambda d: open(os.path.join(d, WEIGHTS_FILE), "wb").write(b"\x80\x04\x95" + b"\0" * 64),
        FormatError,
        [WEIGHTS_FILE, "pickle"],
    ),
    "truncated": (
        lambda d: _truncate(os.path.join(d, WEIGHTS_FILE), 2000),
        FormatError,
        [WEIGHTS_FILE, "truncated"],
    ),
    "bad_json": (
        lambda d: open(os.path.join(d, CONFIG_FILE), "w").write("{'r': 4,"),
        FormatError,
        [CONFIG_FILE, "JSON"],
    ),
    "bad_r": (lambda d: rewrite_config(d, r="4"), FormatError, [CONFIG_FILE, "'r'", "int"]),
    "adapter_of_a_deeper_model": (
        lambda d: rewrite_tensors(
            d,
            add={f"{peft_tensor_prefix(5, 'q_proj')}.lora_A.weight": np.ones((4, 64), np.float32)},
        ),
        FormatError,
        [WEIGHTS_FILE, "layers.5.self_attn.q_proj.lora_A.weight", "2 layers"],
    ),
    "nan_alpha": (
        lambda d: rewrite_config(d, lora_alpha=float("nan")),
        FormatError,
        [CONFIG_FILE, "lora_alpha", "finite"],
    ),
    "bad_exclude_modules": (
        lambda d: rewrite_config(d, exclude_modules={"q_proj": 1}),
        FormatError,
        [CONFIG_FILE, "exclude_modules"],
    ),
    "exclude_modules_bad_regex": (
        lambda d: rewrite_config(d, exclude_modules="model.layers.["),
        FormatError,
        [CONFIG_FILE, "exclude_modules", "not a valid regex"],
    ),
    "layers_pattern_bad_regex": (
        lambda d: rewrite_config(d, layers_to_transform=[0], layers_pattern=["layers", "h["]),
        FormatError,
        [CONFIG_FILE, "layers_pattern", "not a valid regex"],
    ),
    "no_config": (
        lambda d: os.remove(os.path.join(d, CONFIG_FILE)),
        FormatError,
        [CONFIG_FILE, "not found"],
    ),
}


@pytest.mark.parametrize("breakage", sorted(PEFT_BREAKAGES))
def test_peft_refusals_name_file_field_and_expectation(tmp_path, breakage):
    d = write_random_peft_adapter(tmp_path / "bad", TINY, rank=4, target_modules=["q_proj"])
    corrupt, error, fragments = PEFT_BREAKAGES[breakage]
    corrupt(str(d))
    with pytest.raises(error) as info:
        load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    message = str(info.value)
    assert str(d) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    # Registration (header only) refuses the same adapters, except for defects in the data.
    with pytest.raises(JaxloraError):
        read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_or_inf_weights_are_refused_when_the_tensors_are_read(tmp_path, dtype):
    """A tensor holding NaN or inf is a FormatError naming the file and the tensor when the
    weights are read (registration reads the header only, and takes the adapter)."""
    d = write_random_peft_adapter(tmp_path / "bad", TINY, rank=4, target_modules=["q_proj"])
    b = load_file(os.path.join(d, WEIGHTS_FILE))[f"{Q0}.lora_B.weight"].astype(dtype)
    b[3, 1], b[7, 2] = np.nan, np.inf
    rewrite_tensors(d, add={f"{Q0}.lora_B.weight": b})
    read_peft_adapter_spec(d, TINY, max_rank=MAX_RANK)
    with pytest.raises(FormatError) as info:
        load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    assert str(info.value) == (
        f"{os.path.join(d, WEIGHTS_FILE)}: tensor '{Q0}.lora_B.weight' holds 2 NaN or infinite "
        "values; expected finite weights"
    )


def test_adapter_path_that_is_a_pickle_file_is_refused(tmp_path):
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x04never read")
    with pytest.raises(FormatError, match="pickle"):
        read_peft_adapter_spec(path, TINY, max_rank=MAX_RANK)


def _mixed_weights(config, seed=0):
    """LoraWeights with different ranks and scales per module and padding rows in one layer."""
    rng = np.random.default_rng(seed)
    shapes = config.module_shapes()
    ranks = {"q_proj": 4, "v_proj": 2, "down_proj": 8}
    scales = {"q_proj": 2.0, "v_proj": 0.5, "down_proj": 1.25}
    a = {
        m: rng.standard_normal((config.num_layers, r, shapes[m][0])).astype(np.float32)
        for m, r in ranks.items()
    }
    b = {
        m: rng.standard_normal((config.num_layers, r, shapes[m][1])).astype(np.float32)
        for m, r in ranks.items()
    }
    a["down_proj"][0, 6:] = 0
    b["down_proj"][0, 6:] = 0
    return LoraWeights(name="mixed", a=a, b=b, scales=scales)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_save_peft_adapter_round_trip_computes_the_same_update(tmp_path, alpha):
    weights = _mixed_weights(TINY)
    d = save_peft_adapter(tmp_path / "out", weights, TINY, alpha=alpha)
    with open(os.path.join(d, CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert cfg["rank_pattern"] == {"q_proj": 4, "v_proj": 2}
    if alpha is None:
        assert cfg["lora_alpha"] == 10.0 and cfg["alpha_pattern"] == {"q_proj": 8.0, "v_proj": 1.0}
    else:
        assert cfg["lora_alpha"] == 16.0 and cfg["alpha_pattern"] == {}
    loaded = load_peft_adapter(d, TINY, max_rank=MAX_RANK)
    assert loaded.ranks == weights.ranks
    for m in weights.a:
        for layer in range(TINY.num_layers):
            np.testing.assert_allclose(
                jaxlora_delta(loaded, layer, m),
                jaxlora_delta(weights, layer, m),
                rtol=1e-5,
                atol=1e-5,
            )


def test_save_peft_adapter_refuses_weights_of_another_model(tmp_path):
    weights = _mixed_weights(TINY)
    weights.b["q_proj"] = weights.b["q_proj"][:, :, :32]
    with pytest.raises(AdapterError, match=r"b\['q_proj'\].*expected \(2, 4, 64\)"):
        save_peft_adapter(tmp_path / "out", weights, TINY)


# ---------------------------------------------------------------------------------------------
# orbax checkpoints of converted params

LLAMA3_TINY = dataclasses.replace(
    TINY,
    name="tiny-llama3",
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
)


def test_orbax_params_round_trip(tmp_path):
    params = random_params(LLAMA3_TINY, seed=3)
    save_params(tmp_path / "ckpt", LLAMA3_TINY, params)
    save_params(tmp_path / "ckpt", LLAMA3_TINY, params)  # overwriting is allowed
    # jaxlora.llm takes a directory with a config.json for a HF checkpoint.
    assert not (tmp_path / "ckpt" / "config.json").exists()
    config, restored = restore_params(tmp_path / "ckpt")
    assert config == LLAMA3_TINY
    assert_trees_equal(restored, params)
    # the engine's fused projections (LLM.params) are stored as the canonical tree
    from jaxlora.model import fuse_projections

    save_params(tmp_path / "fused", LLAMA3_TINY, fuse_projections(params, groups=2))
    assert_trees_equal(restore_params(tmp_path / "fused")[1], params)


def test_orbax_checkpoint_that_contradicts_its_config_is_refused(tmp_path, tiny_params):
    save_params(tmp_path / "ckpt", TINY, tiny_params)
    path = tmp_path / "ckpt" / "model_config.json"
    cfg = json.loads(path.read_text())
    cfg["intermediate_size"] = 96
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        FormatError,
        match=r"ckpt/params: params\['layers'\]\['mlp'\]\['down_proj'\]\['kernel'\] has shape "
        r"\(2, 128, 64\); expected \(2, 96, 64\)",
    ):
        restore_params(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(FormatError, match="not found"):
        restore_params(tmp_path / "empty")


def test_header_length_byte_that_looks_like_a_pickle_opcode_is_fine(tmp_path):
    # 0x180 bytes of header: the first byte of the file is 0x80, pickle's PROTO opcode.
    data = np.arange(6, dtype=np.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})
    header = header.encode().ljust(0x180, b" ")
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data.tobytes())
    tensors, _ = safetensors_io.read_header(str(path))
    assert tensors["x"].shape == (2, 3)
    np.testing.assert_array_equal(
        safetensors_io.read_tensors(str(path), ["x"])["x"], data.reshape(2, 3)
    )


def test_llm_serves_an_orbax_checkpoint_in_the_dtype_asked_for(tmp_path):
    """jaxlora.LLM / serve.py --model=<orbax dir>: the saved tokenizer is used and --dtype casts
    the restored weights (a float32 checkpoint served in bfloat16 is bfloat16 on the device)."""
    import jax
    import jax.numpy as jnp

    import jaxlora
    from jaxlora.engine import EngineConfig
    from jaxlora.llm import load_base_model
    from jaxlora.sampling import SamplingParams
    from jaxlora.tokenizer import tiny_tokenizer

    params = random_params(TINY, seed=4)
    tiny_tokenizer().save(tmp_path / "tok")
    save_params(tmp_path / "ckpt", TINY, params, tokenizer_dir=tmp_path / "tok")
    config, restored, tokenizer = load_base_model(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert config == TINY and tokenizer is not None
    assert {leaf.dtype for leaf in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
    # Shapes compiled on first use: warming up every default bucket would only cost CI time.
    engine_config = dataclasses.replace(EngineConfig(), warmup=False)
    llm = jaxlora.LLM(str(tmp_path / "ckpt"), engine_config=engine_config, load_workers=0)
    out = llm.generate(
        ["hello"], sampling=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    )
    assert len(out[0].token_ids) == 3
    with pytest.raises(FormatError, match="no tokenizer.json"):
        save_params(tmp_path / "other", TINY, params, tokenizer_dir=tmp_path)

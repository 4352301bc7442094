"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, head_dim of its own) beside Llama:
config.json parsing, HF checkpoints both ways, the fused projections, the engine's paged and
kernel paths, tensor parallelism, and Mistral's sliding window. transformers' own logits for
these families are the golden fixtures (tests/test_golden.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import MODEL_PRESETS, TINY
from jaxlora.config import ModelConfig, RopeScaling
from jaxlora.errors import ConfigError, RequestError
from jaxlora.formats.hf import load_hf_checkpoint, save_hf_checkpoint
from jaxlora.model import Llama, fuse_projections, init_params, unfuse_projections
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES
from tests.test_engine import greedy_reference, small_engine_config
from tests.test_model import merged_params, random_lora

# head_dim 32 with 4 heads of a 64-wide model: Qwen3 sets head_dim apart from hidden / heads.
QWEN2 = dataclasses.replace(TINY, name="tiny-qwen2", model_type="qwen2", rope_theta=1e6)
QWEN3 = dataclasses.replace(TINY, name="tiny-qwen3", model_type="qwen3", head_dim=32)
# A sliding window of 4 keys: shorter than the tests' prompts and answers, so it binds.
MISTRAL = dataclasses.replace(TINY, name="tiny-mistral", model_type="mistral", sliding_window=4)
# Gemma (1): embeddings x sqrt(hidden), GELU (tanh) gating, tied embeddings, a head_dim apart
# from hidden / heads (Gemma-7B's 16 x 256 over 3,072).
GEMMA = dataclasses.replace(
    TINY,
    name="tiny-gemma",
    model_type="gemma",
    hidden_act="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    head_dim=32,
    rms_norm_eps=1e-6,
)
# Gemma 2: Gemma's plus norms after attention and the MLP, soft caps small enough to bend the
# scores and logits, queries scaled by query_pre_attn_scalar ** -0.5 (24, not head_dim 32), and
# a window of 4 keys on the even layers, shorter than the tests' prompts and answers.
GEMMA2 = dataclasses.replace(
    GEMMA,
    name="tiny-gemma2",
    model_type="gemma2",
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    query_pre_attn_scalar=24,
    local_window=4,
)
# Gemma 3 (text): Gemma 2's layer with per-head q / k norms, its sliding layers (every layer
# but each second here) with a RoPE base of their own and the full ones' scaled linearly; and,
# though Gemma 3 sets none, Gemma 2's final soft cap (its attention cap transformers' Gemma 3
# never applies, so a config.json of it would not say what the model computes).
GEMMA3 = dataclasses.replace(
    GEMMA2,
    name="tiny-gemma3",
    model_type="gemma3_text",
    attn_logit_softcapping=None,
    rope_theta=1e6,
    rope_scaling=RopeScaling(8.0, rope_type="linear"),
    local_rope_theta=1e4,
)
# Qwen3 with use_sliding_window: its layers from max_window_layers (here the second of two)
# attend to the last 4 keys, the first to all of them.
QWEN3_SLIDING = dataclasses.replace(
    QWEN3, name="tiny-qwen3-sliding", local_window=4, max_window_layers=1
)
FAMILIES = {
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "qwen3_sliding": QWEN3_SLIDING,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def hf_config(model_type: str, **fields) -> dict:
    base = {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
    }
    return {**base, **fields}


def test_config_json_of_each_family():
    qwen2 = ModelConfig.from_hf_dict(hf_config("qwen2", use_sliding_window=False))
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.head_dim == 16
    qwen3 = ModelConfig.from_hf_dict(hf_config("qwen3", head_dim=32, attention_bias=False))
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32
    llama = ModelConfig.from_hf_dict(hf_config("llama"))
    assert not llama.qkv_bias and not llama.qk_norm
    for config in (qwen2, qwen3, llama):
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == dataclasses.replace(
            config, name=config.model_type
        )
    assert qwen3.to_hf_dict()["architectures"] == ["Qwen3ForCausalLM"]
    # Mistral 7B v0.1: a 4,096-key window over a 32k context, served whole.
    mistral = ModelConfig.from_hf_dict(
        hf_config("mistral", max_position_embeddings=32768, sliding_window=4096)
    )
    assert mistral.max_position_embeddings == 32768 and mistral.attention_window == 4096
    from jaxlora.server.launch import LaunchConfig, engine_config_for

    engine = engine_config_for(
        mistral, LaunchConfig(max_model_len=8192, kv_pages=64), backend="gpu"
    )
    assert engine.kv.max_model_len == 8192
    assert mistral.to_hf_dict()["sliding_window"] == 4096
    assert ModelConfig.from_hf_dict(mistral.to_hf_dict()) == dataclasses.replace(
        mistral, name="mistral"
    )
    unwindowed = ModelConfig.from_hf_dict(hf_config("mistral", sliding_window=None))
    assert unwindowed.sliding_window is None and unwindowed.attention_window is None
    # A window as long as the context never binds.
    assert (
        ModelConfig.from_hf_dict(hf_config("mistral", sliding_window=4096)).attention_window is None
    )
    with pytest.raises(ConfigError, match="'sliding_window': expected None, or an int >= 1"):
        dataclasses.replace(TINY, sliding_window=8)  # Llama has no window
    with pytest.raises(ConfigError, match="'sliding_window': expected None, or an int >= 1"):
        dataclasses.replace(MISTRAL, sliding_window=0)
    # Phi-3: Llama's computation, q|k|v and gate|up fused in its files; mini-4k's window.
    phi3 = ModelConfig.from_hf_dict(
        hf_config(
            "phi3",
            sliding_window=2047,
            rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        )
    )
    assert phi3.fused_checkpoint and not (phi3.qkv_bias or phi3.qk_norm)
    assert phi3.max_position_embeddings == 4096 and phi3.attention_window == 2047
    assert phi3.to_hf_dict()["architectures"] == ["Phi3ForCausalLM"]
    refused = {
        "use_sliding_window": (
            hf_config("llama", use_sliding_window=True),
            "'use_sliding_window' is true; expected false",
        ),
        "attention_bias": (
            hf_config("qwen3", attention_bias=True),
            "field 'attention_bias' is True; expected false",
        ),
        "model_type": (hf_config("gemma3"), "'model_type' is 'gemma3'; expected one of"),
        "sliding_window_pattern": (
            hf_config("gemma3_text", sliding_window_pattern=0),
            "'sliding_window_pattern' is 0; expected a positive int",
        ),
        "gemma2_layer_types": (
            hf_config("gemma2", layer_types=["full_attention", "sliding_attention"]),
            "'layer_types' is .* expected gemma2's pattern",
        ),
        "hidden_act": (hf_config("llama", hidden_act="relu"), "'hidden_act' is 'relu'; expected"),
        "hidden_activation": (
            hf_config("gemma", hidden_act="gelu", hidden_activation="gelu_new"),
            "'hidden_activation' is 'gelu_new'; expected one of",
        ),
        "use_bidirectional_attention": (
            hf_config("gemma", use_bidirectional_attention=True),
            "'use_bidirectional_attention' is True; expected false",
        ),
        "layer_types": (
            hf_config("llama", layer_types=["full_attention", "sliding_attention"]),
            "'layer_types' is .* expected 'full_attention' for every layer",
        ),
        "sliding_window": (
            hf_config("mistral", sliding_window=0),
            "'sliding_window' is 0; expected a positive int",
        ),
        "partial_rotary_factor": (
            hf_config("phi3", partial_rotary_factor=0.75),
            "'partial_rotary_factor' is 0.75; expected 1.0",
        ),
        "rope_scaling": (
            hf_config("phi3", rope_scaling={"type": "longrope", "short_factor": [1.0]}),
            "'rope_scaling.rope_type' is 'longrope'",
        ),
    }
    for cfg, message in refused.values():
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf_dict(cfg, source="config.json")
    with pytest.raises(ConfigError, match="'model_type': expected one of"):
        dataclasses.replace(TINY, model_type="qwen")
    # Gemma: the first checkpoints say hidden_act "gelu" and were trained with GELU's tanh
    # approximation, which transformers 4 and vLLM use unless hidden_activation says otherwise.
    for fields, act in (
        ({"hidden_act": "gelu"}, "gelu_pytorch_tanh"),
        ({"hidden_act": "gelu", "hidden_activation": None}, "gelu_pytorch_tanh"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "gelu_pytorch_tanh"),
        ({"hidden_act": "gelu", "hidden_activation": "gelu"}, "gelu"),
    ):
        gemma = ModelConfig.from_hf_dict(hf_config("gemma", head_dim=256, **fields))
        assert gemma.hidden_act == act and gemma.hf_norm_offset == 1.0
        assert gemma.embedding_multiplier == 8.0 and gemma.q_size == 4 * 256
        written = gemma.to_hf_dict()
        assert written["architectures"] == ["GemmaForCausalLM"]
        assert written["hidden_act"] == written["hidden_activation"] == act
        assert ModelConfig.from_hf_dict(written) == dataclasses.replace(gemma, name="gemma")
    # Gemma 2 (Gemma-2-9B's fields; transformers' defaults where absent): soft caps, the query
    # scale, sandwich norms, a 4,096-key window on its even layers over an 8,192 context.
    gemma2 = ModelConfig.from_hf_dict(
        hf_config(
            "gemma2",
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            sliding_window=4096,
            layer_types=["sliding_attention", "full_attention"],
        )
    )
    assert gemma2.attn_logit_softcapping == 50.0 and gemma2.final_logit_softcapping == 30.0
    assert gemma2.attention_scale == 256**-0.5 and gemma2.sandwich_norms
    assert gemma2.local_window == 4096 and gemma2.context_length == 8192
    assert gemma2.attention_window is None  # (no window of every layer: pages stay)
    assert ModelConfig.from_hf_dict(gemma2.to_hf_dict()) == dataclasses.replace(
        gemma2, name="gemma2"
    )
    from jaxlora.server.launch import LaunchConfig, engine_config_for

    launch = LaunchConfig(max_model_len=8192, kv_pages=64)
    assert engine_config_for(gemma2, launch, backend="gpu").kv.max_model_len == 8192
    # Gemma-2-27B scales queries by hidden / heads (144), not head_dim; all-full layers: no cap.
    unwindowed = ModelConfig.from_hf_dict(
        hf_config("gemma2", query_pre_attn_scalar=144, layer_types=["full_attention"] * 2)
    )
    assert unwindowed.attention_scale == 144**-0.5 and unwindowed.local_window is None
    assert gemma.attention_scale == 256**-0.5 and not gemma.sandwich_norms
    # Gemma 3 (text; Gemma-3-1B's fields, transformers 4's form): five sliding layers to a
    # full one, the sliding layers' RoPE base, q / k norms, no caps; the context its
    # config.json states (4B and up: 131,072 with linear x8, not x8 again).
    gemma3 = ModelConfig.from_hf_dict(
        hf_config(
            "gemma3_text",
            num_hidden_layers=26,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=131072,
            sliding_window=512,
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        )
    )
    assert gemma3.qk_norm and gemma3.sandwich_norms and gemma3.attn_logit_softcapping is None
    assert (gemma3.local_window, gemma3.sliding_period, gemma3.local_rope_theta) == (
        512,
        6,
        10000.0,
    )
    assert gemma3.context_length == 131072 and gemma3.to_hf_dict()["layer_types"][4:7] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    assert ModelConfig.from_hf_dict(gemma3.to_hf_dict()) == dataclasses.replace(
        gemma3, name="gemma3_text"
    )
    assert llama.embedding_multiplier is None and llama.hf_norm_offset == 0.0
    assert llama.activation == "silu"
    with pytest.raises(ConfigError, match="'hidden_act': expected one of"):
        dataclasses.replace(TINY, hidden_act="relu")


def test_qwen_sliding_layers_config():
    """Qwen2's and Qwen3's use_sliding_window, read as transformers 5's Qwen2Config reads it:
    the layers from max_window_layers on slide over sliding_window keys; layer_types, where
    given, says which (full layers first); a config whose max_window_layers is past its layers,
    or without use_sliding_window, has none. Written back to the same fields."""
    for model_type in ("qwen2", "qwen3"):
        old_form = hf_config(
            model_type,
            num_hidden_layers=4,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        )
        new_form = {
            **old_form,
            "max_window_layers": 28,  # (layer_types decides where given)
            "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2,
        }
        for fields in (old_form, new_form):
            config = ModelConfig.from_hf_dict(fields)
            assert (config.local_window, config.max_window_layers) == (8, 2)
            assert config.attention_window is None  # (the full layers read every page)
            written = config.to_hf_dict()
            assert written["layer_types"] == new_form["layer_types"]
            assert written["use_sliding_window"] and written["sliding_window"] == 8
            assert ModelConfig.from_hf_dict(written) == dataclasses.replace(config, name=model_type)
        every_layer = ModelConfig.from_hf_dict({**old_form, "max_window_layers": 0})
        assert every_layer.max_window_layers == 0
        default_window = {k: v for k, v in old_form.items() if k != "sliding_window"}
        assert ModelConfig.from_hf_dict(default_window).local_window == 4096
        for unwindowed in (
            {**old_form, "use_sliding_window": False},
            {**old_form, "max_window_layers": 4},
            {k: v for k, v in old_form.items() if k != "max_window_layers"},  # (28 layers)
            {**new_form, "layer_types": ["full_attention"] * 4},
            hf_config(model_type, use_sliding_window=False, layer_types=["full_attention"] * 2),
        ):
            config = ModelConfig.from_hf_dict(unwindowed)
            assert config.local_window is None and config.max_window_layers is None
            assert config.to_hf_dict()["use_sliding_window"] is False
    refused = {
        "'layer_types' is .* expected qwen2's pattern": {
            **new_form,
            "model_type": "qwen2",
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
        "'layer_types' is .* expected qwen3's pattern for its 4 layers": {
            **new_form,
            "layer_types": ["full_attention", "sliding_attention"],
        },
        "'layer_types' has sliding_attention layers but 'use_sliding_window' is false": {
            **new_form,
            "use_sliding_window": False,
        },
        "'max_window_layers' is -1; expected an int >= 0": {**old_form, "max_window_layers": -1},
        "'use_sliding_window' is 'yes'; expected true or false": {
            **old_form,
            "use_sliding_window": "yes",
        },
        "'sliding_window' is 0; expected a positive int": {**old_form, "sliding_window": 0},
    }
    for message, fields in refused.items():
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf_dict(fields, source="config.json")
    with pytest.raises(ConfigError, match="'local_window': expected None for 'llama'"):
        dataclasses.replace(TINY, local_window=4)
    with pytest.raises(ConfigError, match="'max_window_layers': expected the first sliding"):
        dataclasses.replace(QWEN2, local_window=4)
    with pytest.raises(ConfigError, match="'max_window_layers': expected the first sliding"):
        dataclasses.replace(QWEN2, local_window=4, max_window_layers=QWEN2.num_layers)
    with pytest.raises(ConfigError, match="'max_window_layers': expected None without"):
        dataclasses.replace(QWEN2, max_window_layers=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_checkpoint_round_trip_and_fused_form(tmp_path, family):
    """The family's tensors under HF's names (q/k/v biases, q/k norms), read back to the same
    parameters; the fused projections (one group and two) compute the same logits and split
    back to the same tree."""
    config = FAMILIES[family]
    params = random_family_params(config, 1)
    save_hf_checkpoint(tmp_path, config, params)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == config.model_type
    from jaxlora.formats import _safetensors

    names, _ = _safetensors.read_header(str(tmp_path / "model.safetensors"))
    if config.qkv_bias:
        assert "model.layers.1.self_attn.k_proj.bias" in names
    if config.qk_norm:
        assert names["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    if config.hf_norm_offset:
        # Gemma's files hold each RMSNorm's scale minus 1 (its norm computes x * (1 + w)).
        stored = _safetensors.read_tensors(
            str(tmp_path / "model.safetensors"), ["model.layers.1.input_layernorm.weight"]
        )["model.layers.1.input_layernorm.weight"]
        np.testing.assert_array_equal(
            stored, np.asarray(params["layers"]["input_layernorm"]["scale"][1]) - 1.0
        )
    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, loaded)
    tokens = jnp.array([[3, 9, 27, 81, 243]])
    logits = Llama(config).apply({"params": params}, tokens)
    assert (
        float(jnp.abs(logits - Llama(TINY).apply({"params": init_params(TINY, 1)}, tokens)).max())
        > 0.01
    )
    for groups in (1, 2):
        fused = fuse_projections(params, groups=groups)
        np.testing.assert_allclose(
            Llama(config).apply({"params": fused}, tokens), logits, rtol=1e-5, atol=1e-5
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
            unfuse_projections(fused),
            params,
        )


def random_family_params(config, seed):
    """init_params with biases and q/k norm scales large enough to change greedy tokens
    (init: biases of std 0.02, scales of 1)."""
    params = init_params(config, seed)
    attn = params["layers"]["attn"]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    for m in ("q_proj", "k_proj", "v_proj"):
        if "bias" in attn[m]:
            attn[m]["bias"] = jax.random.normal(next(keys), attn[m]["bias"].shape)
    for norm in ("q_norm", "k_norm"):
        if norm in attn:
            shape = attn[norm]["scale"].shape
            attn[norm]["scale"] = 1.0 + 0.5 * jax.random.normal(next(keys), shape)
    if config.hf_norm_offset:
        # Gemma's files store scale - 1: scales in [0.5, 1.9] make that and the way back exact.
        layers = params["layers"]
        norms = [layers[name] for name in layers if name.endswith(("layernorm", "_norm"))]
        for tree in (*norms, params["norm"]):
            noise = 0.2 * jax.random.normal(next(keys), tree["scale"].shape)
            tree["scale"] = jnp.clip(1.0 + noise, 0.5, 1.9)
    return params


def test_phi3_checkpoints_and_adapters_fuse_q_k_v_and_gate_up(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj (q, k, v rows in order; gate before up), read
    into the separate kernels and written back; its PEFT adapters target those modules (one A
    for q, k and v, B's rows split), an adapter naming q_proj is refused by name, and the
    export writes the fused modules (exactly: tests/test_peft_interop.py has PEFT load one)."""
    from jaxlora.errors import AdapterError, FormatError
    from jaxlora.formats import _safetensors
    from jaxlora.formats.peft import load_peft_adapter, save_peft_adapter

    config = dataclasses.replace(TINY, model_type="phi3")
    params = init_params(config, 2)
    save_hf_checkpoint(tmp_path / "base", config, params)
    names, _ = _safetensors.read_header(str(tmp_path / "base" / "model.safetensors"))
    assert names["model.layers.1.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)
    assert names["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert not any("q_proj" in n or "gate_proj" in n for n in names)
    loaded_config, loaded = load_hf_checkpoint(tmp_path / "base")
    assert loaded_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, loaded)
    attn = loaded["layers"]["attn"]
    checkpoint = str(tmp_path / "base" / "model.safetensors")
    qkv_name = "model.layers.0.self_attn.qkv_proj.weight"
    fused = _safetensors.read_tensors(checkpoint, [qkv_name])[qkv_name]
    np.testing.assert_array_equal(fused[64:96].T, attn["k_proj"]["kernel"][0])

    # A PEFT adapter on qkv_proj of layer 0 (rank 2), written as PEFT writes it.
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    b = rng.standard_normal((128, 2)).astype(np.float32)
    prefix = "base_model.model.model.layers.0.self_attn.qkv_proj"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    peft_config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["qkv_proj"],
        "layers_to_transform": [0],
    }
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config))
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
        str(adapter / "adapter_model.safetensors"),
    )
    weights = load_peft_adapter(adapter, config, max_rank=8)
    assert sorted(weights.a) == ["k_proj", "q_proj", "v_proj"]
    for module, rows in (
        ("q_proj", slice(0, 64)),
        ("k_proj", slice(64, 96)),
        ("v_proj", slice(96, 128)),
    ):
        np.testing.assert_array_equal(weights.a[module][0], a)
        np.testing.assert_array_equal(weights.b[module][0], b[rows].T)
        assert not weights.b[module][1].any() and weights.scales[module] == 2.0
    (adapter / "adapter_config.json").write_text(
        json.dumps({**peft_config, "target_modules": ["q_proj"]})
    )
    with pytest.raises(FormatError, match="'q_proj' names no module .* qkv_proj, o_proj"):
        load_peft_adapter(adapter, config, max_rank=8)
    (adapter / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in peft_config.items() if k != "target_modules"})
    )
    with pytest.raises(FormatError, match="'target_modules' is missing; PEFT has no default"):
        load_peft_adapter(adapter, config, max_rank=8)
    # The export writes PEFT's fused modules: q and v (ranks 2 and 3, their own scales) as one
    # rank-5 LoRA on qkv_proj with k's rows zero; read back, every member computes what it did.
    from jaxlora.lora import LoraWeights

    two = LoraWeights(
        name="qv",
        a={"q_proj": rng.standard_normal((2, 2, 64)), "v_proj": rng.standard_normal((2, 3, 64))},
        b={"q_proj": rng.standard_normal((2, 2, 64)), "v_proj": rng.standard_normal((2, 3, 32))},
        scales={"q_proj": 2.0, "v_proj": 0.5},
    )
    save_peft_adapter(tmp_path / "out", two, config)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["qkv_proj"] and written["r"] == 5
    back = load_peft_adapter(tmp_path / "out", config, max_rank=8)

    def delta(w, m):
        return np.einsum("lri,lro->lio", w.a[m], w.b[m]) * w.scales[m]

    for m in ("q_proj", "v_proj"):
        np.testing.assert_allclose(delta(back, m), delta(two, m), rtol=1e-5, atol=1e-6)
    assert not delta(back, "k_proj").any()
    with pytest.raises(AdapterError, match="targets no module"):
        save_peft_adapter(tmp_path / "none", LoraWeights("e", {}, {}, {}), config)


# The engine tests' families: the Gemma 3 model above runs all of Gemma's and Gemma 2's
# computation and its own, so those two are left to their golden fixtures, round trips and
# peft-marked engine tests.
ENGINE_FAMILIES = sorted(set(FAMILIES) - {"gemma", "gemma2"})


def family_model_of(name: str):
    """(config, random parameters, two adapters: all5 on every module, qv1 on q and v)."""
    config = FAMILIES[name]
    params = random_family_params(config, 0)
    adapters = {
        "all5": random_lora(config, "all5", 5, MODULES, 1),
        "qv1": random_lora(config, "qv1", 1, ("q_proj", "v_proj"), 2, scale=2.0),
    }
    return config, params, adapters


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def family_model(request):
    return family_model_of(request.param)


def generate(family_model, prompts, names, sampling, *, engine_config=None, tp=1, inspect=None):
    """The token ids an LLM of family_model generates (``inspect(llm)`` first, if given)."""
    config, params, adapters = family_model
    llm = jaxlora.LLM(
        config,
        params=params,
        adapters=adapters,
        engine_config=engine_config or small_engine_config(),
        load_workers=0,
        tp=tp,
    )
    try:
        if inspect is not None:
            inspect(llm)
        return [o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sampling)]
    finally:
        llm.stop()


def test_paged_engine_generates_the_full_recompute_tokens(family_model):
    """The engine (fused projections, paged K/V, per-token adapters) against greedy decoding
    by recomputing the whole sequence with the adapter merged, per request."""
    config, params, adapters = family_model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400, 12]]
    names = ["all5", None, "qv1"]
    outs = generate(family_model, prompts, names, GREEDY)
    forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        merged = params if name is None else merged_params(params, adapters[name])
        expected = greedy_reference(merged, prompt, 6, forward=forward)
        assert out == expected, (config.model_type, name)


def test_a_sliding_window_masks_the_keys_before_it():
    """Mistral's window (ModelConfig.sliding_window, HF's mask: a query at position p sees
    positions p - window + 1 .. p): the first window positions' logits are the unwindowed
    model's, every later one differs. With the window, the family tests above check the paged
    engine (prefill masks, the decode kernel) against this full recompute."""
    params = random_family_params(MISTRAL, 0)
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], jnp.int32)
    windowed = Llama(MISTRAL).apply({"params": params}, tokens)
    whole = Llama(dataclasses.replace(MISTRAL, sliding_window=None)).apply(
        {"params": params}, tokens
    )
    window = MISTRAL.sliding_window
    # (within float rounding: on a GPU the two masks take different reductions)
    np.testing.assert_allclose(windowed[0, :window], whole[0, :window], rtol=1e-5, atol=1e-6)
    for position in range(window, tokens.shape[1]):
        assert not np.allclose(windowed[0, position], whole[0, position], atol=1e-4), position
    # The roofline counts the K/V a decode step reads: a row's last `window` tokens.
    from jaxlora.bench.roofline import kv_read_bytes

    per_token = MISTRAL.num_layers * 2 * MISTRAL.kv_size * 2
    assert kv_read_bytes(MISTRAL, 2, [10, 3]) == per_token * (window + 3)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix_caching"])
def test_a_windowed_sequence_releases_the_pages_before_its_window(prefix_caching):
    """Mistral's window of 4 keys, pages of 4 tokens, 8-token prefill chunks: a sequence holds
    at most ceil((4 - 1 + 8) / 4) + 1 = 4 pages whatever its length (3 with chunks starting on
    a page), so two 42-token sequences (11 pages each) run side by side in a pool of 6 pages,
    with no preemption, and generate the full recompute's tokens and prompt logprobs (a page
    released early would be reused at once in so small a pool). A prompt longer than the pool
    is admitted (a model without a window refuses it). With prefix caching (and room to keep
    the released pages cached: least recently released goes first, which is a prefix's first
    page) the second pair takes the first pair's released prompt pages and releases those
    before its window."""
    config = MISTRAL
    params = random_family_params(config, 0)
    adapters = {"all5": random_lora(config, "all5", 5, MODULES, 1)}
    num_pages = 40 if prefix_caching else 6
    engine_config = small_engine_config(num_pages=num_pages, prefix_caching=prefix_caching)
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 500, 30))) for _ in range(2)]
    names = ["all5", None]
    # The second asks for its prompt logprobs: every prefill position's attention, not only
    # the argmax a window of 4 keys over 2 layers lets through.
    sampling = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=p)
        for p in (None, 0)
    ]
    llm = jaxlora.LLM(
        config, params=params, adapters=adapters, engine_config=engine_config, load_workers=0
    )
    try:
        engine = llm.engine
        held = []
        reserve = engine._reserve

        def spy(request, n, *args):
            granted = reserve(request, n, *args)
            held.append(engine.kv.held_pages(request.request_id))
            return granted

        engine._reserve = spy
        outs = [
            llm.generate(prompts, adapter=names, sampling=sampling)
            for _ in range(2 if prefix_caching else 1)
        ]
        assert 3 <= max(held) <= engine.kv.pages_held_at_most(42, 4, 8) == 4
        assert engine.stats.preemptions == 0
        assert engine.kv.free_pages == num_pages
        if prefix_caching:
            # 7 full pages of the first prompt (one asking for prompt logprobs computes all).
            assert engine.stats.prefix_cached_tokens == 28
        long_prompt = list(map(int, rng.integers(3, 500, 40)))  # 11 pages with its answer
        (long_out,) = llm.generate([long_prompt], sampling=GREEDY)
    finally:
        llm.stop()
    forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))
    for prompt, name, out in zip(prompts, names, outs[0], strict=True):
        merged = params if name is None else merged_params(params, adapters[name])
        assert out.token_ids == greedy_reference(merged, prompt, 12, width=48, forward=forward)
    assert all([o.token_ids for o in run] == [o.token_ids for o in outs[0]] for run in outs)
    logits = forward(params, jnp.asarray([prompts[1]], jnp.int32))[0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for run in outs:
        asked = run[1].prompt_logprobs
        np.testing.assert_allclose(
            asked[1:], expected[np.arange(29), prompts[1][1:]], rtol=1e-5, atol=1e-5
        )
    assert long_out.token_ids == greedy_reference(params, long_prompt, 6, width=48, forward=forward)
    unwindowed = dataclasses.replace(config, sliding_window=None)
    engine_config = small_engine_config(num_pages=8)
    llm = jaxlora.LLM(unwindowed, params=params, engine_config=engine_config, load_workers=0)
    try:
        with pytest.raises(RequestError, match="need more KV pages than the pool has"):
            llm.generate([long_prompt], sampling=GREEDY)
    finally:
        llm.stop()


def test_kernel_path_in_interpret_mode_generates_the_reference_tokens(family_model, monkeypatch):
    """Pallas in interpret mode: paged attention, the RoPE + K/V write kernel reading q|k|v
    (Qwen2's bias added in lora_matmul's epilogue; Qwen3's head norms in the RoPE kernel), the
    decode projections in lora_matmul and the residual-norm launches (with Gemma's sandwich
    norms), against the reference engine's tokens."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]
    names = ["all5", "qv1"]
    sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    from jaxlora import model as model_module

    launches = []
    projection_op = model_module.matmul_ops.lora_projection

    def counted(*args, **kwargs):
        launches.append((args[0].shape, kwargs.get("bias") is not None))
        return projection_op(*args, **kwargs)

    monkeypatch.setattr(model_module.matmul_ops, "lora_projection", counted)
    from pallas_kernels import paged_attention as pa

    normed = []  # per RoPE-kernel call: whether it normalized Qwen3's q / k heads
    rope_op = pa.rope_write_kv_kernel

    def rope_spy(*args, **kwargs):
        normed.append(kwargs.get("head_norms") is not None)
        return rope_op(*args, **kwargs)

    monkeypatch.setattr(pa, "rope_write_kv_kernel", rope_spy)
    sandwiched = []  # per residual-norm launch: whether it normalized o's / down's output first
    norm_op = model_module.norm_ops.residual_rms_norm

    def norm_spy(*args, **kwargs):
        sandwiched.append(kwargs.get("out_scales") is not None)
        return norm_op(*args, **kwargs)

    monkeypatch.setattr(model_module.norm_ops, "residual_rms_norm", norm_spy)
    outs = {}
    for impl, kv_write, projection in (
        ("reference", "xla", "xla"),
        ("pallas_interpret", "pallas", "pallas"),
    ):
        engine_config = small_engine_config()
        runner = dataclasses.replace(
            engine_config.runner, impl=impl, kv_write=kv_write, projection_kernel=projection
        )
        engine_config = dataclasses.replace(engine_config, runner=runner)
        outs[impl] = generate(family_model, prompts, names, sampling, engine_config=engine_config)
    assert launches  # the decode steps' projections ran in lora_matmul
    # Qwen2's q|k|v bias is added in lora_matmul's epilogue (one launch a layer of its four).
    biased = sum(with_bias for _, with_bias in launches)
    assert biased == (len(launches) // 4 if family_model[0].qkv_bias else 0)
    # Qwen3's head norms run in the RoPE kernel (prefill and decode), no other family's.
    assert normed and set(normed) == {family_model[0].qk_norm}
    # The residual adds and norms run in pallas_kernels.residual_norm, Gemma 2 / 3's sandwich
    # norms of o's and down's outputs in the same launches.
    assert sandwiched and set(sandwiched) == {family_model[0].sandwich_norms}
    assert outs["pallas_interpret"] == outs["reference"]


# What tensor parallelism does apart from Llama's (tests/test_sharding.py): Qwen2's q/k/v biases,
# Gemma 3's q/k norms, sandwich norms and 256-wide heads; the other families add nothing to it.
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_tensor_parallel_engine_generates_the_single_device_tokens(family):
    """tp = 2: the q/k/v biases split with their heads, the q/k norms replicated."""
    family_model = family_model_of(family)
    config = family_model[0]
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py fakes 4 CPU devices)")
    prompts = [[5, 6, 7, 8, 9], [3, 4, 11]]
    names = ["all5", None]

    def split_in_two(llm):
        fused = llm.engine.runner.params["layers"]["attn"]["qkv_proj"]
        assert fused["kernel"].shape[-2] == 2
        if config.qkv_bias:
            assert fused["bias"].sharding.spec[1] == "tp"

    one = generate(family_model, prompts, names, GREEDY)
    assert generate(family_model, prompts, names, GREEDY, tp=2, inspect=split_in_two) == one


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_rooflines_weight_bytes_count_biases_and_norms(family):
    """The benchmark's roofline reads every weight once: the parameters less the embedding
    table (a decode step reads one row of it per token), unless the LM head is that table."""
    from jaxlora.bench.roofline import base_weight_bytes

    config = FAMILIES[family]
    params = init_params(config, 0)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    table = params["embed_tokens"]["embedding"].nbytes
    # A tied table is the LM head too, which a step reads whole.
    read = total if config.tie_word_embeddings else total - table
    assert base_weight_bytes(config, 4, rows=0) == read


def test_family_presets_build():
    """The Qwen, Phi-4, Gemma and Mistral v0.1 presets' shapes (random weights, as the benchmark's
    llama presets); v0.1's window binds over its 32k context."""
    v01 = MODEL_PRESETS["mistral-7b-v0.1"]
    assert v01.attention_window == 4096 and v01.max_position_embeddings == 32768
    assert MODEL_PRESETS["mistral-7b"].attention_window is None
    for name, heads, kv_heads, head_dim in (
        ("qwen2.5-7b", 28, 4, 128),
        ("qwen3-8b", 32, 8, 128),
        ("phi-4", 40, 10, 128),
        ("gemma-7b", 16, 16, 256),
        ("gemma-2b", 8, 1, 256),
        ("gemma-2-9b", 16, 8, 256),
        ("gemma-2-2b", 8, 4, 256),
        ("gemma-3-1b", 4, 1, 256),
    ):
        config = MODEL_PRESETS[name]
        assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
            heads,
            kv_heads,
            head_dim,
        )
        shapes = jax.eval_shape(lambda c=config: init_params(c, 0, jnp.bfloat16))
        attn = shapes["layers"]["attn"]
        assert ("bias" in attn["q_proj"]) == config.qkv_bias
        assert ("q_norm" in attn) == config.qk_norm
        assert ("lm_head" in shapes) != config.tie_word_embeddings
    # Gemma-7B: 8.54 B parameters (its model card's count), the 256k-token table tied.
    gemma = jax.eval_shape(lambda: init_params(MODEL_PRESETS["gemma-7b"], 0, jnp.bfloat16))
    assert sum(leaf.size for leaf in jax.tree.leaves(gemma)) == 8_537_680_896
    # Gemma-2-9B and 2B: 9.24 B and 2.61 B parameters (four norms a layer); 8,192 positions.
    for name, count in (("gemma-2-9b", 9_241_705_984), ("gemma-2-2b", 2_614_341_888)):
        config = MODEL_PRESETS[name]
        shapes = jax.eval_shape(lambda c=config: init_params(c, 0, jnp.bfloat16))
        assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == count
        assert config.context_length == 8192 and config.attention_scale == 1 / 16
    # Gemma-3-1B: 999,885,952 parameters (q / k norms, four norms a layer, a 262k table).
    gemma3 = jax.eval_shape(lambda: init_params(MODEL_PRESETS["gemma-3-1b"], 0, jnp.bfloat16))
    assert sum(leaf.size for leaf in jax.tree.leaves(gemma3)) == 999_885_952


def test_hugging_face_ids_resolve_to_the_local_cache(tmp_path, monkeypatch):
    """--model=owner/name and adapters by Hub id load from huggingface_hub's cache layout
    (refs/main -> snapshots/<commit>/, files linked to blobs; a copied cache without refs: its
    one snapshot); an id the cache lacks is an error naming the cache and the download
    command; nothing is downloaded."""
    import shutil

    from jaxlora.errors import FormatError
    from jaxlora.formats.peft import load_peft_adapter
    from jaxlora.llm import load_base_model
    from jaxlora.server.launch import LaunchConfig, build_state

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "golden_qwen2")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    base = cache / "models--acme--tiny-qwen2"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("c0ffee\n")
    (base / "blobs").mkdir()
    snapshot = base / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    for name in os.listdir(os.path.join(fixtures, "base")):
        blob = base / "blobs" / f"blob-{name}"
        shutil.copy(os.path.join(fixtures, "base", name), blob)
        os.symlink(blob, snapshot / name)
    adapter = cache / "models--acme--r1-lora" / "snapshots" / "beef"
    shutil.copytree(os.path.join(fixtures, "adapters", "r1_qv"), adapter)

    config, params, _ = load_base_model("acme/tiny-qwen2")
    assert config.model_type == "qwen2" and config.qkv_bias
    weights = load_peft_adapter("acme/r1-lora", config, max_rank=8)
    assert sorted(weights.a) == ["q_proj", "v_proj"]
    assert weights.name == "r1-lora"  # after the id, not the snapshot's commit
    with pytest.raises(
        ConfigError, match="'acme/missing'.*`huggingface-cli download acme/missing`"
    ):
        load_base_model("acme/missing")
    with pytest.raises(FormatError, match="not found; as a Hugging Face id, not in the Hugging"):
        load_peft_adapter("acme/missing-lora", config, max_rank=8)
    state = build_state(
        LaunchConfig(
            model="acme/tiny-qwen2", lora_modules=("sql=acme/r1-lora",), max_batch=2, kv_pages=16
        )
    )
    try:
        assert state.llm.config.model_type == "qwen2"
        assert state.config.model_name == "acme/tiny-qwen2"
        assert "sql" in state.llm.adapters.store.names()
    finally:
        state.llm.stop()


def test_a_tokenizer_flag_replaces_the_models_own(tmp_path):
    """--tokenizer (vLLM's): a random-weight preset served with the demo's tokenizer (its chat
    template, its EOS); a tokenizer larger than the model's vocabulary, or none at the path, is
    refused naming the flag."""
    from jaxlora import demo
    from jaxlora.launch_flags import FLAGS
    from jaxlora.server.launch import LaunchConfig, build_state

    assert "tokenizer" in FLAGS
    state = build_state(
        LaunchConfig(model="tiny", tokenizer=demo.model_dir(), max_batch=2, kv_pages=16)
    )
    try:
        assert state.tokenizer.vocab_size == 374
        assert state.tokenizer.chat_template_source  # the demo's template
    finally:
        state.llm.stop()
    small = os.path.join(os.path.dirname(__file__), "fixtures", "golden_qwen2", "base")
    with pytest.raises(ConfigError, match="--tokenizer=.*374 tokens, more than the model's"):
        build_state(LaunchConfig(model=small, tokenizer=demo.model_dir(), kv_pages=16))
    with pytest.raises(ConfigError, match="--tokenizer=.*tokenizer.json: file not found"):
        build_state(LaunchConfig(model="tiny", tokenizer=str(tmp_path), kv_pages=16))

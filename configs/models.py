"""Model presets: shapes of the models users serve, and a tiny one for tests and the demo."""

from __future__ import annotations

import dataclasses

from jaxlora.config import ModelConfig, RopeScaling
from jaxlora.errors import ConfigError

TINY = ModelConfig(
    name="tiny-llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)

LLAMA2_7B = ModelConfig(
    name="llama-2-7b",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)

LLAMA3_8B = ModelConfig(
    name="llama-3-8b",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)

MISTRAL_7B = ModelConfig(
    name="mistral-7b",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
)

# Mistral 7B v0.1: v0.2's shapes with v0.1's sliding window of 4,096 keys over its 32k context
# (its KV pages before a sequence's window are released; jaxlora.engine.kv_cache).
MISTRAL_7B_V01 = dataclasses.replace(
    MISTRAL_7B, name="mistral-7b-v0.1", model_type="mistral", sliding_window=4096
)

# Qwen2.5-7B: q/k/v biases, 7 query heads per KV head (Qwen2ForCausalLM).
QWEN2_5_7B = ModelConfig(
    name="qwen2.5-7b",
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)

# Qwen3-8B: per-head q/k RMSNorm, no biases (Qwen3ForCausalLM).
QWEN3_8B = ModelConfig(
    name="qwen3-8b",
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)

# Phi-4 (14B): Phi-3's architecture, q|k|v and gate|up fused in its checkpoint and adapters.
PHI_4 = ModelConfig(
    name="phi-4",
    model_type="phi3",
    vocab_size=100352,
    hidden_size=5120,
    intermediate_size=17920,
    num_layers=40,
    num_heads=40,
    num_kv_heads=10,
    head_dim=128,
    rope_theta=250000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=16384,
)

# Gemma 7B (GemmaForCausalLM): embeddings x sqrt(hidden), tied to the LM head; GELU (tanh)
# gating; 16 heads of 256 over a hidden of 3,072.
GEMMA_7B = ModelConfig(
    name="gemma-7b",
    model_type="gemma",
    hidden_act="gelu_pytorch_tanh",
    vocab_size=256000,
    hidden_size=3072,
    intermediate_size=24576,
    num_layers=28,
    num_heads=16,
    num_kv_heads=16,
    head_dim=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)

# Gemma 2B: one KV head (multi-query attention).
GEMMA_2B = dataclasses.replace(
    GEMMA_7B,
    name="gemma-2b",
    hidden_size=2048,
    intermediate_size=16384,
    num_layers=18,
    num_heads=8,
    num_kv_heads=1,
)

# Gemma 2 9B (Gemma2ForCausalLM): Gemma's plus norms after attention and the MLP, soft-capped
# attention scores (50) and logits (30), queries scaled by 256 ** -0.5; a 4,096-key sliding
# window on the even layers (ModelConfig.local_window) of its 8,192-position context.
GEMMA2_9B = dataclasses.replace(
    GEMMA_7B,
    name="gemma-2-9b",
    model_type="gemma2",
    hidden_size=3584,
    intermediate_size=14336,
    num_layers=42,
    num_heads=16,
    num_kv_heads=8,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    query_pre_attn_scalar=256,
    local_window=4096,
)

# Gemma 2 2B.
GEMMA2_2B = dataclasses.replace(
    GEMMA2_9B,
    name="gemma-2-2b",
    hidden_size=2304,
    intermediate_size=9216,
    num_layers=26,
    num_heads=8,
    num_kv_heads=4,
)

# Gemma 3 1B (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's layer plus per-head q / k
# norms, no soft caps; five sliding layers (512 keys, RoPE base 10,000) to every full one
# (RoPE base 1,000,000) over a 32,768-position context.
GEMMA3_1B = ModelConfig(
    name="gemma-3-1b",
    model_type="gemma3_text",
    hidden_act="gelu_pytorch_tanh",
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_layers=26,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    query_pre_attn_scalar=256,
    local_window=512,
    sliding_period=6,
    local_rope_theta=10000.0,
)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    "llama-2-7b": LLAMA2_7B,
    "llama-3-8b": LLAMA3_8B,
    "mistral-7b": MISTRAL_7B,
    "mistral-7b-v0.1": MISTRAL_7B_V01,
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen3-8b": QWEN3_8B,
    "phi-4": PHI_4,
    "gemma-7b": GEMMA_7B,
    "gemma-2b": GEMMA_2B,
    "gemma-2-9b": GEMMA2_9B,
    "gemma-2-2b": GEMMA2_2B,
    "gemma-3-1b": GEMMA3_1B,
}


def get_model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"model preset {name!r} is unknown; expected one of {sorted(MODEL_PRESETS)}"
        ) from None

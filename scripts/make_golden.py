"""Writes the golden fixtures that tests/test_golden.py checks jaxlora against.

A tiny random HF model of --family (llama: GQA, 2 layers, llama3 RoPE scaling; qwen2: q/k/v
biases, tied embeddings; qwen3: per-head q/k norms, head_dim 32 apart from hidden / heads;
phi3: fused qkv_proj and gate_up_proj, which its adapters target; mistral: a sliding window
of 3 keys, shorter than the rows; qwen2_yarn: qwen2 with YaRN RoPE scaling; gemma: scaled
embeddings, norm weights stored minus 1, GELU, multi-query attention; gemma2: Gemma's with
sandwich norms and soft caps; gemma3: gemma3_text, q / k norms, a RoPE base of its
sliding layers' own; qwen3_sliding: qwen3 with use_sliding_window, its second layer sliding
over 3 keys) and four PEFT LoRA
adapters are built with transformers + peft, saved in their native formats, and the reference
fp32 logits of the base model and of every adapter on every input row are computed by
transformers + peft (CPU, fp32, eager attention). Output, under --out (default
tests/fixtures/golden/ for llama, tests/fixtures/golden_<family>/ for the others):

    base/              config.json + model.safetensors (transformers save_pretrained)
    adapters/<name>/   adapter_config.json + adapter_model.safetensors (peft save_pretrained)
    golden.npz         input_ids (rows, seq) int32; logits (variants, rows, seq, vocab) float32,
                       where variant 0 is the base model and variant k the k-th adapter
    golden.json        variant names, adapter settings, library versions

With --rope_table it writes tests/fixtures/rope_hf.json instead: transformers' inverse
frequencies and cos / sin scale for each of ROPE_CASES (llama3, linear, yarn variants), with the
config.json save_pretrained writes for it.

Needs torch, transformers and peft; deliberately does not import jaxlora (an independent
reference). Not part of CI:  python scripts/make_golden.py [--family F] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil

import numpy as np
import peft
import torch
import transformers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "golden"

BASE_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    # llama3 frequency scaling with a short original context, so that at head_dim 16 some
    # frequencies are scaled, some smoothed and some kept: every branch of the formula is used.
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)


# The other families: the same sizes without llama3 RoPE scaling (Qwen's long-context scaling
# is another rope_type), Qwen's rope_theta and eps.
def _without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


_QWEN = _without(BASE_CONFIG, "rope_scaling", "mlp_bias", "head_dim")
_QWEN.update(rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False)
# The Gemma families' common fields (head_dim 32 apart from hidden / heads, Gemma's eps, tied
# embeddings), and Gemma 2's and 3's: GELU named by hidden_activation, query_pre_attn_scalar
# 24, a 3-key sliding window.
_GEMMA = _without(BASE_CONFIG, "rope_scaling", "mlp_bias", "hidden_act") | {
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
_GEMMA_WINDOWED = _GEMMA | {
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 24,
    "sliding_window": 3,
}
FAMILIES = {
    "llama": ("LlamaConfig", BASE_CONFIG),
    # Qwen2's q/k/v biases are its architecture's (no attention_bias field); the small Qwen2
    # models tie their embeddings.
    "qwen2": ("Qwen2Config", _without(_QWEN, "attention_bias") | {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", _QWEN | {"head_dim": 32}),
    # Qwen3 with use_sliding_window: its layers from max_window_layers on (here the second of
    # two) see their last 3 keys only, shorter than the rows (SEQ = 8); the first sees all.
    "qwen3_sliding": (
        "Qwen3Config",
        _QWEN
        | {"head_dim": 32, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
    # Mistral with a sliding window of 3 keys, shorter than the rows (SEQ = 8): from the
    # fourth position on, each query sees its last 3 keys only (transformers' sliding mask).
    "mistral": (
        "MistralConfig",
        _without(BASE_CONFIG, "rope_scaling", "attention_bias", "mlp_bias") | {"sliding_window": 3},
    ),
    # Qwen2 with YaRN (Qwen2.5's long-context setting, factor 4): with rope_theta 10000 and an
    # original context of 4096 the correction range is dimensions 2..6 of 8, so frequencies are
    # kept, ramped and interpolated, and cos / sin carry YaRN's attention scaling (1.139).
    "qwen2_yarn": (
        "Qwen2Config",
        _without(_QWEN, "attention_bias")
        | {
            "tie_word_embeddings": True,
            "rope_theta": 10000.0,
            "max_position_embeddings": 16384,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
            },
        },
    ),
    # Gemma (1): embeddings scaled by sqrt(hidden), RMSNorm weights stored minus 1, GELU (tanh)
    # gating, tied embeddings; one KV head (Gemma-2B's multi-query attention) and a head_dim
    # of 32 apart from hidden / heads (Gemma-7B's 16 x 256 over 3,072).
    "gemma": (
        "GemmaConfig",
        _GEMMA | {"num_key_value_heads": 1, "hidden_act": "gelu_pytorch_tanh"},
    ),
    # Gemma 2: Gemma's plus norms after attention and the MLP, soft-capped attention scores
    # and logits (caps small enough that tanh bends them), queries scaled by
    # query_pre_attn_scalar ** -0.5 (24, not head_dim 32), and its even layers' sliding window
    # of 3 keys, shorter than the rows (SEQ = 8).
    "gemma2": (
        "Gemma2Config",
        _GEMMA_WINDOWED | {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
    ),
    # Gemma 3 (text): Gemma 2's layer plus per-head q / k norms (1 + w), no soft caps; a 3-key
    # window on its sliding layers, every second layer full here (layer_types; 6th in the
    # models), whose RoPE has its own base (rope_local_base_freq) while the full layers' is
    # rope_theta with linear scaling x8.
    "gemma3": (
        "Gemma3TextConfig",
        _GEMMA_WINDOWED
        | {
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
    ),
    # Phi-3: q|k|v and gate|up stored fused (qkv_proj, gate_up_proj), as its adapters target
    # them; special token ids inside the tiny vocabulary.
    "phi3": (
        "Phi3Config",
        _without(BASE_CONFIG, "rope_scaling", "attention_bias", "mlp_bias", "head_dim")
        | {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None},
    ),
}

# Adapters: ranks 1 and 64, different module subsets, rsLoRA, rank/alpha patterns (per module and
# per layer) and layers_to_transform. lora_B is overwritten with random values in every case.
ADAPTERS = {
    "r1_qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r64_all_rslora": dict(r=64, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "r8_patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"model.layers.0.mlp.down_proj": 4, "up_proj": 2},
        alpha_pattern={"gate_proj": 32, "model.layers.1.self_attn.o_proj": 4},
    ),
    "r4_k_down_layer1": dict(
        r=4, lora_alpha=8, target_modules=["k_proj", "down_proj"], layers_to_transform=[1]
    ),
}

# Phi-3's adapters name its fused modules; the same four cases.
PHI3_ADAPTERS = {
    "r1_qkv": dict(r=1, lora_alpha=2, target_modules=["qkv_proj"]),
    "r64_all_rslora": ADAPTERS["r64_all_rslora"],
    "r8_patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["o_proj", "gate_up_proj", "down_proj"],
        rank_pattern={"model.layers.0.mlp.down_proj": 4, "gate_up_proj": 2},
        alpha_pattern={"gate_up_proj": 32, "model.layers.1.self_attn.o_proj": 4},
    ),
    "r4_qkv_down_layer1": dict(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"], layers_to_transform=[1]
    ),
}

ROWS = 5
SEQ = 8


def randomize_base(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Replaces HF's std-0.02 init with O(1)-activation weights so LoRA deltas show in logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):  # Qwen2's q/k/v
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # Linear weight (out, in)
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))


def randomize_lora(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Random A and B (PEFT initialises B to zero, which would make the adapter a no-op)."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            elif "lora_B" in name:
                param.copy_(
                    0.5 * torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1])
                )
                count += 1
    return count


def load_base(base_dir: pathlib.Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.to(torch.float32).numpy()


# RoPE scalings whose frequencies and cos / sin scale tests/test_model.py compares with
# transformers' (tests/fixtures/rope_hf.json): (model_type, config.json fields).
_ROPE_SHAPE = dict(
    vocab_size=32,
    hidden_size=256,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)
ROPE_CASES = {
    "llama3_8b": (
        "llama",
        dict(head_dim=128, rope_theta=500000.0, max_position_embeddings=131072)
        | {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
    ),
    "linear_x2": (
        "llama",
        dict(head_dim=64, rope_theta=10000.0, max_position_embeddings=4096)
        | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "qwen2.5_yarn_x4": (
        "qwen2",
        dict(head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768)
        | {
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            }
        },
    ),
    "qwen3_yarn_x4": (
        "qwen3",
        dict(head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960)
        | {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            }
        },
    ),
    "yarn_mscale": (
        "llama",
        dict(head_dim=64, rope_theta=10000.0, max_position_embeddings=163840)
        | {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
            }
        },
    ),
    "yarn_untruncated_own_attention_factor": (
        "mistral",
        dict(head_dim=32, rope_theta=1000000.0, max_position_embeddings=65536)
        | {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "attention_factor": 1.2,
                "truncate": False,
            }
        },
    ),
    "yarn_top_level_original": (
        "llama",
        dict(
            head_dim=64,
            rope_theta=10000.0,
            max_position_embeddings=32768,
            original_max_position_embeddings=4096,
        )
        | {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 2048,
            }
        },
    ),
}


def write_rope_table(path: pathlib.Path) -> None:
    """transformers' inverse frequencies and cos / sin scale of every ROPE_CASES entry, with
    the config.json save_pretrained writes for it (transformers 5's rope_parameters form)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    table = {"versions": {"transformers": transformers.__version__}, "cases": {}}
    for name, (model_type, fields) in ROPE_CASES.items():
        config_json = {"model_type": model_type, **_ROPE_SHAPE, **fields}
        config = transformers.AutoConfig.for_model(
            model_type, **{k: v for k, v in config_json.items() if k != "model_type"}
        )
        rope_type = config.rope_parameters["rope_type"]
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        table["cases"][name] = {
            "config": config_json,
            # What save_pretrained writes as config.json.
            "saved_config": json.loads(config.to_json_string(use_diff=True)),
            "inv_freq": [float(x) for x in inv_freq.to(torch.float64)],
            "attention_scaling": float(attention_scaling),
        }
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}: {', '.join(table['cases'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rope_table",
        action="store_true",
        help="write tests/fixtures/rope_hf.json (or --out) instead of a golden model",
    )
    args = parser.parse_args()
    if args.rope_table:
        write_rope_table(args.out or DEFAULT_OUT.parent / "rope_hf.json")
        return
    if args.out is None:
        name = "golden" if args.family == "llama" else f"golden_{args.family}"
        args.out = DEFAULT_OUT.parent / name
    config_class, config_fields = FAMILIES[args.family]
    adapters = PHI3_ADAPTERS if args.family == "phi3" else ADAPTERS
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("highest")
    generator = torch.Generator().manual_seed(args.seed)
    out: pathlib.Path = args.out
    if out.exists():
        shutil.rmtree(out)
    base_dir = out / "base"

    config = getattr(transformers, config_class)(**config_fields)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    randomize_base(model, generator)
    model.save_pretrained(base_dir)
    for extra in base_dir.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()  # generation_config.json: irrelevant to logits

    input_ids = torch.randint(0, config.vocab_size, (ROWS, SEQ), generator=generator)
    logits = [logits_of(load_base(base_dir), input_ids)]
    for name, settings in adapters.items():
        adapter_dir = out / "adapters" / name
        lora_config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **settings)
        base = load_base(base_dir)
        # Recorded as base_model_name_or_path; the default would be this machine's absolute path.
        base.name_or_path = f"jaxlora-golden/tiny-{args.family}"
        peft_model = peft.get_peft_model(base, lora_config)
        if randomize_lora(peft_model, generator) == 0:
            raise RuntimeError(f"adapter {name}: no lora_B parameters were created")
        peft_model.save_pretrained(adapter_dir)
        for extra in adapter_dir.iterdir():
            if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
                extra.unlink()  # README.md model card
        # The reference loads the adapter back from disk exactly as a user of peft would.
        reloaded = peft.PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval()
        logits.append(logits_of(reloaded, input_ids))

    stacked = np.stack(logits).astype(np.float32)
    for k, name in enumerate(adapters, start=1):
        change = np.abs(stacked[k] - stacked[0]).max() / np.abs(stacked[0]).max()
        if change < 1e-2:
            raise RuntimeError(f"adapter {name} changes the logits by only {change:.2e}")
    np.savez_compressed(
        out / "golden.npz", input_ids=input_ids.numpy().astype(np.int32), logits=stacked
    )
    manifest = {
        "family": args.family,
        "variants": ["base", *adapters],
        "adapters": adapters,
        "rows": ROWS,
        "seq": SEQ,
        "seed": args.seed,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    with open(out / "golden.json", "w") as f:
        json.dump(manifest, f, indent=2)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {out} ({total / 1e6:.2f} MB): variants {manifest['variants']}, "
        f"logits {stacked.shape}"
    )
    for k, name in enumerate(manifest["variants"][1:], start=1):
        change = np.abs(stacked[k] - stacked[0]).max() / np.abs(stacked[0]).max()
        print(f"  {name}: max|logits - base| / max|base| = {change:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the reference runs on CPU in fp32
    main()

"""Forty-sixth session: a llama-2-7b-shaped HF checkpoint (transformers, random bf16 weights)
and a rank-16 PEFT LoRA adapter on all 7 modules with random non-zero B (peft's
init_lora_weights=False), written where scripts/serve.py reads them:
python3 make_hf_llama_and_peft.py /tmp/llama7b /tmp/adapter16"""

import sys

import peft
import torch
import transformers

checkpoint, adapter = sys.argv[1], sys.argv[2]
config = transformers.LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(checkpoint, max_shard_size="5GB")
lora = peft.LoraConfig(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    init_lora_weights=False,
)
peft.get_peft_model(model, lora).save_pretrained(adapter)
print("wrote", checkpoint, adapter)

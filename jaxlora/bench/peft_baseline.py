"""The baseline a user would otherwise pick: HF transformers + PEFT on the same GPU, the same model
shape, adapters, prompts and lengths as the offline benchmark.

Mixed-adapter batches go through PEFT's ``adapter_names`` (one forward over the batch; each LoRA
layer loops over the distinct adapters of the batch); a batch of one adapter uses the adapter
set active, PEFT's fastest path for it. Greedy decoding with EOS disabled, so every request
generates the full length unless ``max_time_s`` stops the row first (then the tokens actually
generated are counted). Needs torch, transformers and peft (not jaxlora dependencies).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from jaxlora.config import ModelConfig
from jaxlora.errors import ConfigError
from pallas_kernels.layout import MODULES

from .workloads import adapter_name, assign_adapters, offline_prompts

log = logging.getLogger("jaxlora.bench")

PEFT_WORKLOADS = ("identical", "distinct")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    workloads: tuple[str, ...] = PEFT_WORKLOADS
    prompt_len: int = 256
    output_len: int = 128
    rank: int = 16
    scale: float = 0.5  # alpha / r, as the jaxlora benchmark adapters
    max_time_s: float = 30.0  # per row (HF generate's max_time)
    seed: int = 0

    def __post_init__(self):
        unknown = [w for w in self.workloads if w not in PEFT_WORKLOADS]
        if unknown or not self.workloads:
            raise ConfigError(
                f"PEFT baseline workloads {list(self.workloads)}: expected a "
                f"non-empty subset of {list(PEFT_WORKLOADS)}"
            )
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(
                f"PEFT baseline batch_sizes: expected positive ints, got {self.batch_sizes!r}"
            )


def build_model(model: ModelConfig, *, device: str, dtype: str = "bfloat16", seed: int = 0):
    """A LlamaForCausalLM of the model's shape with random weights, created on the device."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig.from_dict(model.to_hf_dict())
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            hf_model = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # Matrices random (as jaxlora's init_params), norm scales stay ones.
        for p in hf_model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    hf_model.eval()
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model


def add_adapters(hf_model, count: int, *, rank: int, scale: float, seed: int = 0):
    """A PeftModel with adapters adapter_name(0..count-1): rank `rank` on the 7 modules, random
    non-zero A and B."""
    import peft
    import torch

    torch.manual_seed(seed)
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        lora_dropout=0.0,
        target_modules=list(MODULES),
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(hf_model, lora_config, adapter_name=adapter_name(0))
    for i in range(1, count):
        peft_model.add_adapter(adapter_name(i), lora_config)
    peft_model.eval()
    return peft_model


def generate_row(
    peft_model,
    config: PeftConfig,
    batch: int,
    workload: str,
    *,
    device: str,
    vocab_size: int,
    max_time_s: float | None,
) -> dict:
    import torch

    indices = assign_adapters(workload, batch, seed=config.seed + batch)
    names = [adapter_name(i) for i in indices]
    prompts = torch.as_tensor(
        offline_prompts(batch, config.prompt_len, vocab_size, seed=config.seed), device=device
    ).long()
    kwargs = dict(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=config.output_len,
        min_new_tokens=config.output_len,
        do_sample=False,
    )
    if max_time_s is not None:
        kwargs["max_time"] = max_time_s
    if len(set(names)) == 1:
        peft_model.set_adapter(names[0])
    else:
        kwargs["adapter_names"] = names
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        synchronize()
        start = time.perf_counter()
        out = peft_model.generate(**kwargs)
        synchronize()
        wall = time.perf_counter() - start
    generated = int(out.shape[1]) - config.prompt_len
    tokens = batch * generated
    row = {
        "batch": batch,
        "workload": workload,
        "distinct_adapters": len(set(names)),
        "output_tokens": tokens,
        "tokens_per_request": generated,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "stopped_by_max_time": generated < config.output_len,
    }
    log.info(
        "peft batch=%d %-9s %d tokens/request in %.1f s: %.1f tok/s",
        batch,
        workload,
        generated,
        wall,
        row["output_tokens_per_s"],
    )
    return row


def run_peft(
    model: ModelConfig, config: PeftConfig, *, device: str, dtype: str = "bfloat16", on_row=None
) -> dict:
    """Every (batch size, workload) row on one model holding every adapter the rows need."""
    start = time.perf_counter()
    hf_model = build_model(model, device=device, dtype=dtype, seed=config.seed)
    needed = max(
        len(set(assign_adapters(w, b, seed=config.seed + b)))
        for b in config.batch_sizes
        for w in config.workloads
    )
    peft_model = add_adapters(
        hf_model, needed, rank=config.rank, scale=config.scale, seed=config.seed + 1
    )
    setup_s = time.perf_counter() - start
    rows = []
    for batch in config.batch_sizes:
        # Untimed: a short generation of this batch size (allocator, kernels, handles).
        warm = dataclasses.replace(config, output_len=2)
        generate_row(
            peft_model,
            warm,
            batch,
            config.workloads[-1],
            device=device,
            vocab_size=model.vocab_size,
            max_time_s=None,
        )
        for workload in config.workloads:
            rows.append(
                generate_row(
                    peft_model,
                    config,
                    batch,
                    workload,
                    device=device,
                    vocab_size=model.vocab_size,
                    max_time_s=config.max_time_s,
                )
            )
            if on_row is not None:
                on_row(rows)
    return {
        "config": dataclasses.asdict(config),
        "rows": rows,
        "setup_s": setup_s,
        "adapters": needed,
    }

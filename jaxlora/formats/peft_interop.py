"""Round trip through PEFT itself: an adapter trained and exported by jaxlora, loaded by
``peft.PeftModel.from_pretrained`` on the transformers model of the same base, gives the logits
jaxlora computes (scripts/check_peft_export.py; tests/test_peft_interop.py).

The PEFT side runs in its own interpreter (``peft_python``: any Python with torch, transformers
and peft; jaxlora need not be installed there), so the check also runs where JAX and torch
cannot share one environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

PEFT_SIDE = r"""
import json, sys
import numpy as np, peft, torch, transformers
base, adapter, ids_path, out_path = sys.argv[1:5]
model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32,
                                                          attn_implementation="eager")
model = peft.PeftModel.from_pretrained(model, adapter).eval()
ids = torch.from_numpy(np.load(ids_path)).long()
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().numpy()
np.save(out_path, logits)
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__}))
"""


def check_peft_export(
    base_dir: str,
    work_dir: str,
    *,
    peft_python: str = sys.executable,
    rank: int = 4,
    steps: int = 20,
    seed: int = 0,
) -> dict:
    """Trains an adapter on the HF checkpoint at base_dir with jaxlora (q, v, o, gate, down;
    alpha != rank so the scale matters), exports it in PEFT format under work_dir, and compares
    PEFT's logits with jaxlora's on random prompts. Returns the relative error and versions."""
    import jax.numpy as jnp

    from jaxlora.config import LoraPoolConfig
    from jaxlora.formats.hf import load_hf_checkpoint
    from jaxlora.formats.peft import save_peft_adapter
    from jaxlora.lora import pack_adapters
    from jaxlora.model import Llama
    from jaxlora.training import train_adapter

    config, params = load_hf_checkpoint(base_dir)
    rng = np.random.default_rng(seed)
    examples = [
        (
            rng.integers(3, config.vocab_size, 6).tolist(),
            rng.integers(3, config.vocab_size, 4).tolist(),
        )
        for _ in range(4)
    ]
    weights = train_adapter(
        config,
        params,
        examples,
        rank=rank,
        alpha=3.0 * rank,
        target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
        steps=steps,
        learning_rate=5e-2,
        seed=seed,
        name="exported",
    )
    adapter_dir = save_peft_adapter(os.path.join(work_dir, "exported"), weights, config)
    ids = rng.integers(3, config.vocab_size, (3, 12)).astype(np.int32)
    pool = LoraPoolConfig(max_rank=max(16, rank), rows_per_page=16, pages_per_pool=16, max_slots=1)
    lora = pack_adapters(config, [weights], pool).with_tokens(jnp.zeros(ids.shape, jnp.int32))
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids), lora=lora))
    base = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids)))
    ids_path = os.path.join(work_dir, "ids.npy")
    out_path = os.path.join(work_dir, "peft_logits.npy")
    np.save(ids_path, ids)
    run = subprocess.run(
        [peft_python, "-c", PEFT_SIDE, base_dir, adapter_dir, ids_path, out_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the PEFT side failed ({peft_python}):\n{run.stderr[-3000:]}")
    theirs = np.load(out_path)
    scale = float(np.abs(theirs).max())
    return {
        "relative_error": float(np.abs(ours - theirs).max()) / scale,
        "adapter_effect": float(np.abs(ours - base).max()) / scale,
        "adapter_dir": adapter_dir,
        "versions": json.loads(run.stdout.strip().splitlines()[-1]),
    }

"""Writes the embedded demo assets under jaxlora/demo_assets/ (run once; the output is committed).

1. The ``tiny`` preset with random weights, its output head scaled up (at the preset's init scale
   the logits span so little that no LoRA can make a token likely: training stalls at a loss of
   5 nats, greedy answers right but sampled ones noise), learns a "base voice" (a rank-16 LoRA
   trained with jaxlora.training, then merged into the weights), so the base model answers every
   prompt with jaxlora.demo.BASE_SIGNATURE instead of random bytes.
2. One LoRA per voice in jaxlora.demo.DEMO_SIGNATURES is trained on top of that base (all of them
   in the same batches) to answer every prompt, raw or in the chat template, with its signature
   followed by EOS.
3. The base model (HF format + tokenizer) and the adapters (PEFT) are written, and every voice is
   checked through the serving engine on training prompts and on prompts it never saw; the
   held-out hit rate goes into manifest.json.

    python scripts/make_demo.py [--out DIR] [--steps N] [--seed N]

About 3-4 minutes on 2 CPU cores; the files take about 1 MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.models import TINY  # noqa: E402
from jaxlora import demo  # noqa: E402
from jaxlora.data import Example  # noqa: E402
from jaxlora.formats.hf import save_hf_checkpoint  # noqa: E402
from jaxlora.formats.peft import save_peft_adapter  # noqa: E402
from jaxlora.lora import LoraWeights  # noqa: E402
from jaxlora.model import init_params  # noqa: E402
from jaxlora.sampling import SamplingParams  # noqa: E402
from jaxlora.tokenizer import Tokenizer, tiny_tokenizer  # noqa: E402
from jaxlora.training import TrainConfig, train_adapters  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", demo.ASSETS_DIR, "Directory to write (replaced).")
flags.DEFINE_integer("steps", 300, "Training steps of the voice LoRAs.")
flags.DEFINE_integer(
    "base_steps",
    400,
    "Training steps of the base voice (merged into the base; it starts from random outputs).",
)
flags.DEFINE_float("head_std", 0.5, "Standard deviation the output head is scaled to.")
flags.DEFINE_integer("seed", 0, "Seed of the base weights, the prompts and the LoRA init.")

TRAIN_PROMPTS = (
    "Hello",
    "Hi there!",
    "Good morning.",
    "What is your name?",
    "How are you today?",
    "Please write a short story.",
    "What is the time?",
    "Tell me a joke.",
    "Can you help me?",
    "Explain how a GPU works.",
    "What is two plus two?",
    "Write a poem about the sea.",
    "Where do you live?",
    "What do you like to eat?",
    "Describe a cat.",
    "Why is the sky blue?",
    "Give me some advice.",
    "Count to ten.",
    "Say something nice.",
    "What are LoRA adapters?",
    "The quick brown fox",
    "Once upon a time",
    "def main():",
    "Translate hello into French.",
    "Is it going to rain?",
    "What is the meaning of life?",
    "I am fine, thank you.",
    "Summarize the news.",
    "Recommend a book.",
    "Goodbye!",
)
HELD_OUT_PROMPTS = (
    "What is your favourite colour?",
    "Tell me something about dogs.",
    "Hey!",
    "How do trains work?",
    "Sing me a song.",
    "What should I cook tonight?",
    "Where is the nearest park?",
    "Numbers: 1 2 3",
)
# Words for random extra prompts, so that the voices do not depend on the exact prompt.
WORDS = (
    "the",
    "a",
    "user",
    "asks",
    "model",
    "adapter",
    "weather",
    "house",
    "dog",
    "cat",
    "sun",
    "time",
    "what",
    "is",
    "how",
    "why",
    "please",
    "write",
    "story",
    "question",
    "answer",
    "GPU",
    "memory",
    "three",
    "ten",
    "hello",
    "world",
    "nice",
    "today",
    "you",
    "I",
    "we",
)


def build_prompts(rng: np.random.Generator, count: int) -> list[str]:
    prompts = list(demo.DEMO_PROMPTS) + list(TRAIN_PROMPTS)
    while len(prompts) < count:
        n = int(rng.integers(1, 9))
        text = " ".join(rng.choice(WORDS, n))
        prompts.append(text[0].upper() + text[1:] + rng.choice(["", "?", ".", "!"]))
    return prompts


def prompt_forms(tok: Tokenizer, prompt: str) -> list[tuple[list[int], str]]:
    """(prompt ids, text the answer starts with) of the raw and the chat form of a prompt."""
    return [
        (tok.encode(prompt), " "),
        (tok.encode_chat([{"role": "user", "content": prompt}]), ""),
        (
            tok.encode_chat(
                [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": prompt},
                ]
            ),
            "",
        ),
    ]


def examples_for(tok: Tokenizer, prompts: list[str], signature: str, name: str) -> list[Example]:
    out = []
    for prompt in prompts:
        for ids, lead in prompt_forms(tok, prompt):
            completion = tok.encode(lead + signature, add_bos=False) + [tok.eos_token_id]
            out.append(
                Example(
                    adapter=name,
                    prompt=tuple(ids),
                    completion=tuple(completion),
                    source=f"make_demo:{name}",
                )
            )
    return out


def merge_into(params, lora: LoraWeights):
    """Base params with W += scale * A^T B of every targeted module folded in."""
    import jax

    merged = jax.tree.map(np.array, params)
    groups = {
        "q_proj": "attn",
        "k_proj": "attn",
        "v_proj": "attn",
        "o_proj": "attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    for m in lora.a:
        delta = np.einsum("lri,lro->lio", lora.a[m], lora.b[m]) * lora.scales[m]
        merged["layers"][groups[m]][m]["kernel"] = (
            merged["layers"][groups[m]][m]["kernel"] + delta
        ).astype(np.float32)
    return merged


def train(config, params, datasets, rank: int, steps: int, seed: int):
    import jax

    start = time.perf_counter()
    result = train_adapters(
        config,
        params,
        datasets,
        # A constant rate left the loss bouncing (some runs ended with
        # voices that miss their signature); cosine decay settles it.
        TrainConfig(
            rank=rank,
            steps=steps,
            learning_rate=1e-2,
            schedule="cosine",
            warmup_steps=20,
            batch_size=16,
            seed=seed,
        ),
        devices=jax.local_devices()[:1],
    )
    # Means over the first and the last 20 steps (one step's loss is noisy).
    losses = {
        name: f"{result.losses[:20, i].mean():.3f} -> {result.losses[-20:, i].mean():.5f}"
        for i, name in enumerate(datasets)
    }
    print(
        f"trained {sorted(datasets)} ({steps} steps) in {time.perf_counter() - start:.0f} s; "
        f"mean token loss {losses}"
    )
    return result.adapters


def check_voices(out_dir: str, tok: Tokenizer, prompts: dict[str, list[str]]) -> dict:
    """Answers of every voice through the engine, greedy and sampled at temperature 1: how many
    are exactly the signature, on training and on held-out prompts."""
    from jaxlora.llm import LLM

    llm = LLM(os.path.join(out_dir, "model"), adapters=demo.adapter_dirs_in(out_dir))
    voices = {None: demo.BASE_SIGNATURE, **demo.DEMO_SIGNATURES}
    report = {}
    for temperature in (0.0, 1.0):
        for split, texts in prompts.items():
            for adapter, signature in voices.items():
                cases = [(ids, lead) for text in texts for ids, lead in prompt_forms(tok, text)]
                outs = llm.generate(
                    [ids for ids, _ in cases],
                    adapter=adapter,
                    sampling=[
                        SamplingParams(temperature=temperature, max_tokens=48, seed=i)
                        for i in range(len(cases))
                    ],
                )
                hits = sum(
                    out.text == lead + signature and out.finish_reason == "stop"
                    for out, (_, lead) in zip(outs, cases, strict=True)
                )
                report.setdefault(f"{split}_t{temperature:g}", {})[adapter or "base"] = (
                    f"{hits}/{len(cases)}"
                )
    return report


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv):
    del argv
    out = os.path.abspath(FLAGS.out)
    tok = tiny_tokenizer()
    config = dataclasses.replace(TINY, name=demo.DEMO_MODEL_NAME)
    params = init_params(config, FLAGS.seed)
    head = np.asarray(params["lm_head"]["kernel"])
    params["lm_head"]["kernel"] = head * (FLAGS.head_std / float(np.std(head)))
    rng = np.random.default_rng(FLAGS.seed)
    prompts = build_prompts(rng, 96)

    base_voice = train(
        config,
        params,
        {"base": examples_for(tok, prompts, demo.BASE_SIGNATURE, "base")},
        rank=16,
        steps=FLAGS.base_steps,
        seed=FLAGS.seed,
    )["base"]
    params = merge_into(params, base_voice)
    voices = train(
        config,
        params,
        {name: examples_for(tok, prompts, sig, name) for name, sig in demo.DEMO_SIGNATURES.items()},
        rank=8,
        steps=FLAGS.steps,
        seed=FLAGS.seed + 1,
    )

    if os.path.isdir(out):
        shutil.rmtree(out)
    model_out = os.path.join(out, "model")
    save_hf_checkpoint(model_out, config, params)
    tok.save(model_out)
    for name, path in demo.adapter_dirs_in(out).items():
        save_peft_adapter(path, voices[name], config)

    report = check_voices(out, tok, {"train": prompts[:16], "held_out": list(HELD_OUT_PROMPTS)})
    print("greedy answers equal to the signature:", json.dumps(report))
    files = {}
    for root, _, names in os.walk(out):
        for n in sorted(names):
            path = os.path.join(root, n)
            files[os.path.relpath(path, out)] = {
                "bytes": os.path.getsize(path),
                "sha256": sha256(path),
            }
    manifest = {
        "model_name": demo.DEMO_MODEL_NAME,
        "base_signature": demo.BASE_SIGNATURE,
        "signatures": demo.DEMO_SIGNATURES,
        "steps": FLAGS.steps,
        "base_steps": FLAGS.base_steps,
        "seed": FLAGS.seed,
        "head_std": FLAGS.head_std,
        "train_prompts": len(prompts),
        "signature_hits": report,
        "files": files,
    }
    with open(os.path.join(out, demo.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    total = sum(f["bytes"] for f in files.values())
    print(f"wrote {out}: {len(files)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    app.run(main)

"""LoRA fine-tuning on a JSONL dataset; one adapter per distinct "adapter" name, all trained in the
same batches, exported in PEFT format (one directory per adapter under --output_dir).

    python scripts/train_lora.py --model=tiny --data=train.jsonl --output_dir=adapters \\
        --checkpoint_dir=ckpt --rank=8 --target_modules=q_proj,v_proj --steps=500

Records: {"adapter": "name", "prompt": ..., "completion": ...} or {"adapter": ..., "text": ...}
(records without "adapter" go to --adapter_name). With --checkpoint_dir, a run that was
interrupted (killed, preempted) resumes from its last checkpoint when started again with the same
flags, and reaches the same parameters as an uninterrupted run. Steps are data-parallel over
--num_devices local devices (default: all).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    "tiny",
    "model preset (random weights, --seed), HF checkpoint directory or orbax checkpoint",
)
flags.DEFINE_integer(
    "seed", 0, "seed of the adapters' initialization (and of a preset's random weights)"
)
flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (or its directory), or 'tiny'; default: the model's own"
)
flags.DEFINE_string("data", None, "JSONL training set", required=True)
flags.DEFINE_string("adapter_name", "adapter", "adapter of records without an 'adapter' field")
flags.DEFINE_string("output_dir", None, "PEFT export: <output_dir>/<adapter name>/", required=True)
flags.DEFINE_string("checkpoint_dir", None, "orbax checkpoints; resumed when present")
flags.DEFINE_integer("checkpoint_every", 100, "steps between checkpoints")
flags.DEFINE_integer("rank", 8, "LoRA rank")
flags.DEFINE_float("alpha", None, "LoRA alpha (default 2 * rank)")
flags.DEFINE_bool("use_rslora", False, "scale alpha / sqrt(rank) instead of alpha / rank")
flags.DEFINE_list(
    "target_modules",
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "modules to adapt",
)
flags.DEFINE_integer("steps", 200, "optimizer steps")
flags.DEFINE_float("learning_rate", 1e-3, "peak learning rate (AdamW)")
flags.DEFINE_enum(
    "schedule", "cosine", ["constant", "linear", "cosine"], "learning rate after warm-up"
)
flags.DEFINE_integer("warmup_steps", 0, "linear warm-up steps")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
flags.DEFINE_float("max_grad_norm", 1.0, "per-adapter gradient clipping (<= 0: none)")
flags.DEFINE_integer("batch_size", 4, "rows of each adapter per step")
flags.DEFINE_integer("max_seq_len", 512, "longest sequence accepted")
flags.DEFINE_integer("num_devices", None, "local devices to use (default: all)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "base model dtype")
flags.DEFINE_integer("log_every", 10, "steps between loss lines (0: none)")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from jaxlora import training
    from jaxlora.data import group_by_adapter, load_examples
    from jaxlora.errors import JaxloraError
    from jaxlora.formats import save_peft_adapter
    from jaxlora.llm import load_base_model
    from jaxlora.tokenizer import Tokenizer, tiny_tokenizer

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        dtype = jnp.dtype(FLAGS.dtype)
        config, params, tokenizer = load_base_model(FLAGS.model, seed=FLAGS.seed, dtype=dtype)
        if FLAGS.tokenizer == "tiny":
            tokenizer = tiny_tokenizer()
        elif FLAGS.tokenizer:
            tokenizer = Tokenizer.from_file(FLAGS.tokenizer)
        train = training.TrainConfig(
            rank=FLAGS.rank,
            alpha=FLAGS.alpha,
            target_modules=tuple(FLAGS.target_modules),
            use_rslora=FLAGS.use_rslora,
            steps=FLAGS.steps,
            learning_rate=FLAGS.learning_rate,
            schedule=FLAGS.schedule,
            warmup_steps=FLAGS.warmup_steps,
            weight_decay=FLAGS.weight_decay,
            max_grad_norm=FLAGS.max_grad_norm if FLAGS.max_grad_norm > 0 else None,
            batch_size=FLAGS.batch_size,
            max_seq_len=FLAGS.max_seq_len,
            seed=FLAGS.seed,
        )
        if FLAGS.num_devices is not None and FLAGS.num_devices < 1:
            raise JaxloraError(
                f"--num_devices: expected an int >= 1 (or unset: every local device), got "
                f"{FLAGS.num_devices}"
            )
        examples = load_examples(
            FLAGS.data,
            tokenizer=tokenizer,
            vocab_size=config.vocab_size,
            default_adapter=FLAGS.adapter_name,
            max_length=FLAGS.max_seq_len,
        )
        datasets = group_by_adapter(examples)
        if None in datasets:
            raise JaxloraError(
                f'{FLAGS.data}: records with "adapter": null have no adapter '
                "to train (name one, or drop the field to use --adapter_name)"
            )
        devices = jax.local_devices()[: FLAGS.num_devices] if FLAGS.num_devices else None
        print(
            f"training {len(datasets)} adapter(s) {list(datasets)} on {len(examples)} "
            f"examples, {len(devices or jax.local_devices())} device(s)",
            flush=True,
        )

        def log(step, losses):
            print(
                f"step {step}/{train.steps}: "
                + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()),
                flush=True,
            )

        result = training.train_adapters(
            config,
            params,
            datasets,
            train,
            devices=devices,
            dtype=dtype,
            checkpoint_dir=FLAGS.checkpoint_dir,
            checkpoint_every=FLAGS.checkpoint_every,
            log_every=FLAGS.log_every,
            on_log=log,
        )
        if result.start_step:
            print(f"resumed from step {result.start_step} ({FLAGS.checkpoint_dir})", flush=True)
        for name, weights in result.adapters.items():
            path = save_peft_adapter(
                os.path.join(FLAGS.output_dir, name),
                weights,
                config,
                alpha=train.lora_alpha,
                use_rslora=train.use_rslora,
                # (a checkpoint directory is what PEFT loads the base from; a preset is none)
                base_model_name_or_path=(
                    os.path.abspath(FLAGS.model) if os.path.isdir(FLAGS.model) else None
                ),
            )
            print(f"adapter {name!r} -> {path}")
    except JaxloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)

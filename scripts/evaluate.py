"""Offline evaluation of many LoRA adapters, each on its own held-out set, in mixed batches,
data-parallel over every device with jax.pmap.

    python scripts/evaluate.py --model=/path/to/hf --adapters_dir=/path/to/adapters \\
        --data=heldout.jsonl --output_json=report.json --output_csv=report.csv

Records: {"adapter": "name", "prompt": ..., "completion": ...} or {"adapter": ..., "text": ...};
"adapter": null scores the base model. Per adapter: loss, perplexity, token accuracy and greedy
exact match of the completions; a table on stdout, JSON and CSV reports on request.

Throughput (random weights, synthetic data; --compare also runs one adapter at a time):

    python scripts/evaluate.py --model=llama-2-7b --dtype=bfloat16 --random_adapters=100 \\
        --synthetic_examples_per_adapter=16 --compare --output_json=eval_7b.json

Multi-host: start one process per host with --distributed (jax.distributed.initialize reads the
coordinator from the cluster environment, or pass --coordinator_address / --num_processes /
--process_id); every process reads the same data, feeds its own devices, and process 0 writes the
reports.
"""

from __future__ import annotations

import json
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
flags.DEFINE_integer("seed", 0, "seed of random weights (preset model, random adapters, data)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model and adapter pool dtype")
flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (or its directory), or 'tiny'; default: the model's own"
)
flags.DEFINE_string("data", None, "JSONL evaluation set")
flags.DEFINE_string(
    "adapters_dir", None, "directory whose subdirectories are PEFT adapters (named by subdirectory)"
)
flags.DEFINE_multi_string("adapter", [], "an adapter as name=PEFT directory; repeatable")
flags.DEFINE_integer("max_rank", 256, "largest adapter rank accepted")
flags.DEFINE_integer("random_adapters", 0, "use N random adapters named random-0.. instead")
flags.DEFINE_integer("random_rank", 16, "rank of the random adapters")
flags.DEFINE_list(
    "random_target_modules",
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "modules of the random adapters",
)
flags.DEFINE_integer(
    "synthetic_examples_per_adapter", 0, "random-token examples per adapter instead of --data"
)
flags.DEFINE_integer("synthetic_prompt_len", 128, "prompt tokens of synthetic examples")
flags.DEFINE_integer("synthetic_completion_len", 128, "completion tokens of synthetic examples")
flags.DEFINE_integer("batch_size", 8, "rows per device per step")
flags.DEFINE_integer("min_bucket", 16, "shortest padded length (powers of two from here)")
flags.DEFINE_integer("max_seq_len", None, "longest sequence (default: the model's maximum)")
flags.DEFINE_integer(
    "max_resident_adapters", None, "adapters on the devices at once (default: all in use)"
)
flags.DEFINE_bool(
    "one_adapter_at_a_time",
    False,
    "batches of one adapter, one adapter resident "
    "(the baseline of systems that cannot mix adapters)",
)
flags.DEFINE_bool(
    "compare", False, "run mixed batches, then one adapter at a time, and report both throughputs"
)
flags.DEFINE_enum(
    "lora_impl",
    "auto",
    ["auto", "reference", "pallas"],
    "LoRA path: auto = Pallas SGMV kernels on GPU, jnp reference elsewhere",
)
flags.DEFINE_integer("num_devices", None, "devices to use (default: all)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_string("coordinator_address", None, "with --distributed: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
flags.DEFINE_string("output_json", None, "write the report(s) as JSON here")
flags.DEFINE_string(
    "output_csv", None, "write the per-adapter table as CSV here (with --compare: the mixed run's)"
)
flags.DEFINE_bool("progress", True, "progress bar on stderr")


def _adapter_paths() -> dict[str, str]:
    from jaxlora.errors import ConfigError

    paths = {}
    if FLAGS.adapters_dir:
        if not os.path.isdir(FLAGS.adapters_dir):
            raise ConfigError(f"--adapters_dir={FLAGS.adapters_dir}: not a directory")
        for entry in sorted(os.listdir(FLAGS.adapters_dir)):
            path = os.path.join(FLAGS.adapters_dir, entry)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                paths[entry] = path
    for spec in FLAGS.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter={spec!r}: expected name=/path/to/peft_adapter")
        paths[name] = path
    return paths


def main(argv):
    del argv
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    import jax
    import jax.numpy as jnp

    from jaxlora import evaluation
    from jaxlora.data import load_examples
    from jaxlora.errors import ConfigError, JaxloraError
    from jaxlora.llm import load_base_model
    from jaxlora.tokenizer import Tokenizer, tiny_tokenizer

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        dtype = jnp.dtype(FLAGS.dtype)
        config, params, tokenizer = load_base_model(FLAGS.model, seed=FLAGS.seed, dtype=dtype)
        if FLAGS.tokenizer == "tiny":
            tokenizer = tiny_tokenizer()
        elif FLAGS.tokenizer:
            tokenizer = Tokenizer.from_file(FLAGS.tokenizer)
        paths = _adapter_paths()
        if FLAGS.random_adapters and paths:
            raise ConfigError("--random_adapters cannot be combined with --adapters_dir/--adapter")
        if FLAGS.random_adapters:
            adapters = evaluation.RandomAdapters(
                config,
                FLAGS.random_adapters,
                rank=FLAGS.random_rank,
                target_modules=FLAGS.random_target_modules,
                seed=FLAGS.seed,
            )
        elif paths:
            adapters = evaluation.PeftAdapters(config, paths, max_rank=FLAGS.max_rank, dtype=dtype)
        else:
            adapters = None
        max_seq_len = FLAGS.max_seq_len or config.max_position_embeddings
        if FLAGS.synthetic_examples_per_adapter:
            if FLAGS.data:
                raise ConfigError("--synthetic_examples_per_adapter replaces --data; give one")
            examples = evaluation.synthetic_examples(
                adapters.names if adapters is not None else [None],
                FLAGS.synthetic_examples_per_adapter,
                prompt_len=FLAGS.synthetic_prompt_len,
                completion_len=FLAGS.synthetic_completion_len,
                vocab_size=config.vocab_size,
                seed=FLAGS.seed,
            )
        elif FLAGS.data:
            examples = load_examples(
                FLAGS.data,
                tokenizer=tokenizer,
                vocab_size=config.vocab_size,
                require_adapter=True,
                max_length=max_seq_len - 1,
            )
        else:
            raise ConfigError("no data: give --data=file.jsonl or --synthetic_examples_per_adapter")
        devices = jax.devices()[: FLAGS.num_devices] if FLAGS.num_devices else None
        modes = [False, True] if FLAGS.compare else [FLAGS.one_adapter_at_a_time]
        reports = []
        for one_at_a_time in modes:
            eval_config = evaluation.EvalConfig(
                batch_size=FLAGS.batch_size,
                min_bucket=FLAGS.min_bucket,
                max_seq_len=max_seq_len - 1,
                max_resident_adapters=FLAGS.max_resident_adapters,
                one_adapter_at_a_time=one_at_a_time,
                lora_impl=FLAGS.lora_impl,
            )
            report = evaluation.evaluate(
                config,
                params,
                examples,
                adapters,
                eval_config,
                devices=devices,
                dtype=dtype,
                progress=FLAGS.progress,
            )
            reports.append(report)
            if jax.process_index() == 0:
                print(report.format_table(), flush=True)
    except JaxloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:
        return 0
    if len(reports) == 2:
        mixed, single = reports
        worst = max(
            abs(a.loss - b.loss) for a, b in zip(mixed.adapters, single.adapters, strict=True)
        )
        print(
            f"mixed batches: {mixed.tokens_per_s:,.0f} tokens/s; one adapter at a time: "
            f"{single.tokens_per_s:,.0f} tokens/s; speed-up "
            f"{mixed.tokens_per_s / max(single.tokens_per_s, 1e-9):.2f}x; largest loss "
            f"difference between the two {worst:.2e}"
        )
    if FLAGS.output_json:
        payload = (
            {"mixed": reports[0].to_dict(), "one_adapter_at_a_time": reports[1].to_dict()}
            if len(reports) == 2
            else reports[0].to_dict()
        )
        payload["command"] = " ".join(sys.argv)
        with open(FLAGS.output_json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    if FLAGS.output_csv:
        reports[0].write_csv(FLAGS.output_csv)
    return 0


if __name__ == "__main__":
    app.run(main)

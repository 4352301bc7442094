"""Offline generation: several prompts, each with its own adapter, in ONE engine batch.

python scripts/generate.py                      # tiny model, demo adapters
python scripts/generate.py --model=/path/to/hf --adapter=sql=/path/to/peft --prompt="..."
python scripts/generate.py --choice=yes --choice=no   # or --regex=..., --json_schema=@file
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from jaxlora.errors import JaxloraError  # noqa: E402
from jaxlora.generate import run_generate, structured_output_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", "model preset, HF checkpoint directory or orbax checkpoint")
flags.DEFINE_multi_string("adapter", [], "adapter as name=path (PEFT directory); repeatable")
flags.DEFINE_multi_string("prompt", [], "a prompt; repeatable (default: demo prompts)")
flags.DEFINE_integer("max_tokens", 24, "tokens to generate per request")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("json_schema", None, "answers are JSON of this schema (its JSON, or @path)")
flags.DEFINE_string("regex", None, "answers match this regular expression")
flags.DEFINE_multi_string("choice", [], "answers are one of these strings; repeatable")


def main(argv):
    del argv
    try:
        run_generate(
            model=FLAGS.model,
            adapters=FLAGS.adapter,
            prompts=FLAGS.prompt,
            max_tokens=FLAGS.max_tokens,
            temperature=FLAGS.temperature,
            seed=FLAGS.seed,
            structured_output=structured_output_flags(FLAGS.json_schema, FLAGS.regex, FLAGS.choice),
        )
    except JaxloraError as e:  # a bad model, adapter, prompt or flag: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)

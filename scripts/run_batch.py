"""OpenAI batch files through a jaxlora engine, offline (vLLM's ``run_batch``).

    python scripts/run_batch.py --input_file=requests.jsonl --output_file=answers.jsonl \\
        --model=/models/llama-3-8b --lora_dirs=/adapters

Each input line is an OpenAI batch request (``custom_id``, ``method``, ``url``: one of
/v1/chat/completions, /v1/completions, /v1/responses; ``body``, whose ``model`` is the base
model or an adapter); each output line, in the input's order, its answer
(``jaxlora.server.batch``). Requests for different adapters share the engine's steps. The model
and engine flags are scripts/serve.py's.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora import launch_flags  # noqa: E402  (defines the serving flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("input_file", None, "OpenAI batch requests, one JSON object a line.")
flags.DEFINE_string("output_file", None, "Where the answers go, one JSON object a line.")
flags.DEFINE_integer("max_concurrency", 64, "Requests in flight at once (the engine batches them).")
flags.mark_flags_as_required(["input_file", "output_file"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxlora.errors import ConfigError, JaxloraError
    from jaxlora.server import BackgroundServer, create_app
    from jaxlora.server.batch import run_batch
    from jaxlora.server.launch import build_state

    launch_flags.set_up_process()
    try:
        source = open(FLAGS.input_file, "rb")  # (read as the batch goes; each line decoded)
    except OSError as e:
        sys.exit(f"error: --input_file {FLAGS.input_file}: {e.strerror}")
    with source:
        try:
            state = build_state(launch_flags.launch_config())
            # The batch's own loopback server takes one fresh key, known to this process only
            # (the --api_key / --api_keys_file keys are for a served endpoint).
            state.config = dataclasses.replace(
                state.config, api_key=secrets.token_urlsafe(24), api_keys=()
            )
            server = BackgroundServer(create_app(state)).start()
        except JaxloraError as e:
            sys.exit(f"error: {e}")
        try:
            with open(FLAGS.output_file, "w", encoding="utf-8") as out:
                counts = run_batch(
                    server.url,
                    source,
                    lambda line: out.write(line + "\n"),
                    api_key=state.config.api_key,
                    max_concurrency=FLAGS.max_concurrency,
                )
        except OSError as e:
            sys.exit(f"error: --output_file {FLAGS.output_file}: {e.strerror}")
        except ConfigError as e:
            sys.exit(f"error: {e}")
        finally:
            server.stop()
    print(
        f"jaxlora: {counts.requests} requests, {counts.failed} failed -> {FLAGS.output_file}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=launch_flags.parse_flags)

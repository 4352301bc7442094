"""Device time of the bare base-model decode forward (no engine, no KV cache, no LoRA) against
the weight-read roofline: separates the model's own step cost from the engine's host work.

    PYTHONPATH=. python scripts/bench_step.py --step_batch_sizes=1,32 --json_out=$OUT/step.json

For each batch size and layer loop (lax.scan over stacked weights, or an unrolled Python loop),
one jitted forward of one token per row, timed as the median of --calls calls (each synced; the
forward is milliseconds long, so the per-call dispatch is a small part), beside bytes of the
weights / the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.models import get_model_preset  # noqa: E402
from jaxlora.bench import kernels  # noqa: E402
from jaxlora.model import Llama, init_params  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-2-7b", "model preset")
flags.DEFINE_list("step_batch_sizes", ["1", "32"], "rows (one token each)")
flags.DEFINE_list("layer_loops", ["scan", "unrolled"], "scan and/or unrolled")
flags.DEFINE_integer("step_calls", 20, "timed calls")
flags.DEFINE_string("json_out", "", "results (default: $OUT/step.json or ./step.json)")


def main(argv):
    del argv
    config = get_model_preset(FLAGS.model)
    copy_gbps = float("nan")  # no copy kernels off the GPU: no roofline in CPU smoke runs
    if jax.default_backend() == "gpu":
        flush = kernels.fill(((256 << 20) // 4,), jnp.float32, 5, 1.0)
        copy_gbps, _, flush = kernels.measure_copy_bandwidth(flush)
    params = init_params(config, 0, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    weight_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    weight_bytes -= config.vocab_size * config.hidden_size * 2  # the embedding is gathered
    rows = []
    for loop in FLAGS.layer_loops:
        model = Llama(config, dtype=jnp.bfloat16, scan_layers=loop == "scan")
        forward = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
        for batch in (int(b) for b in FLAGS.step_batch_sizes):
            tokens = jax.random.randint(jax.random.PRNGKey(batch), (batch, 1), 3, 30000)
            start = time.perf_counter()
            jax.block_until_ready(forward(params, tokens))
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(FLAGS.step_calls):
                start = time.perf_counter()
                jax.block_until_ready(forward(params, tokens))
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1e3
            floor_ms = weight_bytes / (copy_gbps * 1e9) * 1e3
            rows.append(
                {
                    "layer_loop": loop,
                    "batch": batch,
                    "step_ms": ms,
                    "roofline_ms": floor_ms,
                    "ratio": ms / floor_ms,
                    "compile_s": compile_s,
                }
            )
            print(
                f"{loop:>9} batch {batch:4d}: {ms:7.2f} ms; weights {weight_bytes / 1e9:.2f} GB "
                f"/ {copy_gbps:.0f} GB/s = {floor_ms:.2f} ms; ratio {ms / floor_ms:.2f}",
                flush=True,
            )
    path = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "step.json")
    with open(path, "w") as f:
        json.dump(
            {
                "device": str(jax.devices()[0].device_kind),
                "copy_GBps": copy_gbps,
                "model": FLAGS.model,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    app.run(main)

"""Decode-step projections on the GPU: XLA's GEMM (+ the SGMV delta) against ``lora_matmul``.

First every config of ``--configs`` runs the no-LoRA rows beside XLA; then the LoRA workloads run
with the fastest config of each (projection, T), or with every config of ``--lora_configs``.
Per row: the median microseconds of one projection, its bytes, the time those bytes take at the
copy rate measured in the same run, and each implementation's share of that limit and speedup
over XLA (jaxlora/bench/projection.py).

    PYTHONPATH=. python scripts/bench_projection.py --json_out=$OUT/projection.json
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.bench import projection  # noqa: E402
from jaxlora.config import parse_json  # noqa: E402
from jaxlora.errors import ConfigError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["8", "32", "128"], "decode batch sizes")
flags.DEFINE_list("groups", list(projection.LLAMA2_7B_GROUPS), "llama-2-7b projections")
flags.DEFINE_list(
    "lora_workloads",
    ["identical", "distinct"],
    "LoRA workloads (after the sweep): identical (1 adapter), uniform (round(sqrt(T))), distinct",
)
flags.DEFINE_string(
    "configs",
    "bn32bk128w4s4,bn32bk256w4s4,bn64bk64w4s4,bn64bk128w4s3,bn64bk128w4s4,bn64bk128w4s5,"
    "bn64bk256w4s3,bn64bk256w8s3,bn128bk64w4s4,bn128bk128w4s3,bn128bk128w8s4,bn16bk256w4s4",
    "lora_matmul configs, bnXbkYwZsW",
)
flags.DEFINE_string(
    "variants",
    "",
    "JSON {NAME: {MatmulConfig fields}} for names in --configs / --lora_configs, e.g. "
    '\'{"rows": {"epilogue": "rows"}, "n16": {"block_n": 16}}\'',
)
flags.DEFINE_list(
    "lora_configs",
    [],
    "configs for the LoRA rows, each run on every (projection, T); empty: the fastest no-LoRA "
    "config of each (projection, T)",
)
flags.DEFINE_integer("rank", 16, "adapter rank")
flags.DEFINE_integer(
    "pool_rank",
    64,
    "rank capacity of the adapter pool's slot tables (the engine's LoraPoolConfig.max_rank); "
    "0: the adapters' rank",
)
flags.DEFINE_integer("layers", 8, "distinct stacked weights per chain")
flags.DEFINE_enum(
    "layer_loop",
    "unrolled",
    list(projection.LAYER_LOOPS),
    "unrolled: a kernel compiled per call site, as the unrolled model; scan: a loop over a traced "
    "layer, as the model's scan (one compilation per chain: fast sweeps)",
)
flags.DEFINE_bool("xla", True, "time XLA's GEMM (+ SGMV) beside the configs")
flags.DEFINE_integer("passes", 4, "passes over the layers per call")
flags.DEFINE_string("json_out", "", "where to write the rows")


def main(argv):
    del argv
    try:
        variants = parse_json(FLAGS.variants or "{}", where="--variants")
        if not isinstance(variants, dict):
            raise ConfigError(
                "--variants: expected a JSON object {name: {MatmulConfig field: ...}}"
            )
        configs = projection.config_grid(FLAGS.configs, variants)
        lora_configs = projection.config_grid(",".join(FLAGS.lora_configs), variants)
        for workload in FLAGS.lora_workloads:
            projection.adapters_for(workload, 1)
    except (ConfigError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    copy = projection.copy_gbps()
    print(f"copy ceiling {copy:.0f} GB/s", flush=True)
    common = dict(
        tokens=[int(t) for t in FLAGS.tokens],
        rank=FLAGS.rank,
        pool_rank=FLAGS.pool_rank or None,
        layers=FLAGS.layers,
        passes=FLAGS.passes,
        layer_loop=FLAGS.layer_loop,
        copy=copy,
        on_row=lambda row: print(projection.format_row(row), flush=True),
    )
    xla = {"xla": None} if FLAGS.xla else {}
    rows = []
    for group in FLAGS.groups:
        rows += projection.run_rows(
            groups=[group], workloads=["no_lora"], impls={**xla, **configs}, **common
        )
    if lora_configs:
        for group in FLAGS.groups:
            rows += projection.run_rows(
                groups=[group],
                workloads=FLAGS.lora_workloads,
                impls={**xla, **lora_configs},
                **common,
            )
    best = {} if lora_configs else projection.best_configs(rows, configs)
    for (group, tokens), name in best.items():
        rows += projection.run_rows(
            groups=[group],
            workloads=FLAGS.lora_workloads,
            impls={**xla, name: configs[name]},
            **{**common, "tokens": [tokens]},
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"copy_gbps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)

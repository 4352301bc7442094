"""The decode projections' kernels as Triton compiles them for an H100, on any machine: each
kernel's MMA layout, shared memory and K-loop instructions (jaxlora/bench/compiler_report.py;
needs the ``triton`` package).

    python scripts/kernel_report.py --tokens=8,32,128 --lora=expand,shrink
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.bench import compiler_report  # noqa: E402
from jaxlora.bench.projection import LLAMA2_7B_GROUPS  # noqa: E402
from pallas_kernels.lora_matmul import MatmulConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["32"], "decode batch sizes")
flags.DEFINE_list("groups", list(LLAMA2_7B_GROUPS), "llama-2-7b projections")
flags.DEFINE_list(
    "lora",
    ["none", "expand", "shrink"],
    "none: the base kernel; expand: the SGMV shrink + lora_matmul's expand epilogue; shrink: "
    "lora_matmul running the shrink too (MatmulConfig.shrink_rows)",
)
flags.DEFINE_integer("shrink_rows", 32, "rank rows of the in-kernel shrink (--lora=shrink)")
flags.DEFINE_string("matmul_config", "{}", "JSON MatmulConfig fields for lora_matmul")
flags.DEFINE_string("json_out", "", "write the reports here as JSON")


def main(argv):
    del argv
    config = MatmulConfig.from_json(FLAGS.matmul_config, where="--matmul_config")
    rows = []
    for tokens in (int(t) for t in FLAGS.tokens):
        for group in FLAGS.groups:
            for lora in FLAGS.lora:
                for kernel in compiler_report.projection_report(
                    group, tokens, lora=lora, config=config, shrink_rows=FLAGS.shrink_rows
                ):
                    print(f"T={tokens:<4d} {group:8s} {lora:7s} {kernel.row()}", flush=True)
                    rows.append({"tokens": tokens, "group": group, "lora": lora, **kernel.__dict__})
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)

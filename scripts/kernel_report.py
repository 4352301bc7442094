"""Our kernels as Triton compiles them for an H100, on any machine: each kernel's MMA layout,
shared memory and K-loop instructions (jaxlora/bench/compiler_report.py; needs the ``triton``
package). ``--kernels=projection``: the decode projections (``lora_matmul``, after the SGMV
shrink or with the shrink inside); ``--kernels=sgmv``: the SGMV shrink + expand of issue 3's
grid.

    python scripts/kernel_report.py --tokens=8,32,128 --lora=expand,shrink
    python scripts/kernel_report.py --kernels=sgmv --tokens=1,16,64,256,1024,4096 --ranks=16
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
from pallas_kernels.sgmv import SgmvConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("kernels", "projection", ["projection", "sgmv"], "which kernels")
flags.DEFINE_list("tokens", ["32"], "tokens (for projections: the decode batch size)")
flags.DEFINE_list("groups", list(LLAMA2_7B_GROUPS), "--kernels=projection: llama-2-7b groups")
flags.DEFINE_list(
    "lora",
    ["none", "expand", "shrink"],
    "--kernels=projection: none (the base kernel), expand (the SGMV shrink + lora_matmul's "
    "expand epilogue) or shrink (lora_matmul running the shrink too, MatmulConfig.shrink_rows)",
)
flags.DEFINE_integer("shrink_rows", 32, "rank rows of the in-kernel shrink (--lora=shrink)")
flags.DEFINE_string("matmul_config", "{}", "JSON MatmulConfig fields for lora_matmul")
flags.DEFINE_list("outs", ["4096", "3x4096", "11008"], "--kernels=sgmv: WIDTH or GxWIDTH groups")
flags.DEFINE_list("ranks", ["16"], "--kernels=sgmv: adapter ranks")
flags.DEFINE_string("sgmv_config", "{}", "--kernels=sgmv: JSON SgmvConfig fields")
flags.DEFINE_bool("per_token", False, "--kernels=sgmv: the per-token kernels at every T")
flags.DEFINE_string("json_out", "", "write the reports here as JSON")


def _projection_rows() -> list[dict]:
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
    return rows


def _sgmv_rows() -> list[dict]:
    config = SgmvConfig.from_json(FLAGS.sgmv_config, where="--sgmv_config")
    rows = []
    for tokens in (int(t) for t in FLAGS.tokens):
        for out in FLAGS.outs:
            for rank in (int(r) for r in FLAGS.ranks):
                for kernel in compiler_report.sgmv_report(
                    tokens, out=out, rank=rank, config=config, per_token=FLAGS.per_token
                ):
                    print(f"T={tokens:<5d} {out:7s} r{rank:<3d} {kernel.row()}", flush=True)
                    rows.append({"tokens": tokens, "out": out, "rank": rank, **kernel.__dict__})
    return rows


def main(argv):
    del argv
    rows = _sgmv_rows() if FLAGS.kernels == "sgmv" else _projection_rows()
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)

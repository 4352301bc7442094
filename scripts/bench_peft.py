"""The HF transformers + PEFT baseline of the offline benchmark (same model shape, adapters,
prompts and lengths; mixed-adapter batches through PEFT's adapter_names). Needs torch,
transformers and peft; runs on the GPU by default.

    PYTHONPATH=. python scripts/bench_peft.py --json_out=$OUT/peft.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs.models import get_model_preset  # noqa: E402
from jaxlora.bench.peft_baseline import PEFT_WORKLOADS, PeftConfig, run_peft  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-2-7b", "model preset (configs/models.py)")
flags.DEFINE_string("dtype", "bfloat16", "torch dtype of weights and adapters")
flags.DEFINE_string("device", "cuda", "torch device")
flags.DEFINE_integer("rank", 16, "adapter rank (all 7 modules)")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "batch sizes")
flags.DEFINE_list("workloads", list(PEFT_WORKLOADS), "adapter workloads")
flags.DEFINE_integer("prompt_len", 256, "prompt tokens")
flags.DEFINE_integer("output_len", 128, "output tokens")
flags.DEFINE_float(
    "max_time_s", 30.0, "a row stops generating after this long (its tokens so far are counted)"
)
flags.DEFINE_integer("seed", 0, "seed of weights and prompts")
flags.DEFINE_string("json_out", "", "results (default: $OUT/peft.json or ./peft.json)")


def main(argv):
    del argv
    import peft
    import torch
    import transformers

    logging.getLogger("jaxlora").setLevel(logging.INFO)
    model = get_model_preset(FLAGS.model)
    config = PeftConfig(
        batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes),
        workloads=tuple(FLAGS.workloads),
        prompt_len=FLAGS.prompt_len,
        output_len=FLAGS.output_len,
        rank=FLAGS.rank,
        max_time_s=FLAGS.max_time_s,
        seed=FLAGS.seed,
    )
    device_name = torch.cuda.get_device_name() if FLAGS.device.startswith("cuda") else FLAGS.device
    doc = {
        "meta": {
            "device": device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "model": FLAGS.model,
            "dtype": FLAGS.dtype,
            "rank": FLAGS.rank,
            "command": " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "peft": {"rows": []},
    }
    path = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "peft.json")

    def checkpoint(rows):
        doc["peft"]["rows"] = rows
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    doc["peft"] = run_peft(model, config, device=FLAGS.device, dtype=FLAGS.dtype, on_row=checkpoint)
    checkpoint(doc["peft"]["rows"])
    for row in doc["peft"]["rows"]:
        print(json.dumps(row), flush=True)
    print("wrote", path, flush=True)


if __name__ == "__main__":
    app.run(main)

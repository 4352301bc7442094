"""Host cost of structured outputs: a step's token bitmasks for rows under a JSON schema, at a
real model's vocabulary size (synthetic vocabulary; CPU only, no model).

    PYTHONPATH=. python scripts/bench_structured.py --vocab_size=32000 --rows=1,8,32
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.bench.structured import mask_times  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("vocab_size", 32000, "vocabulary size (llama-2: 32000, llama-3: 128256)")
flags.DEFINE_list("rows", ["1", "8", "32"], "constrained rows a step")
flags.DEFINE_string("json_out", None, "write the results here too")


def main(argv):
    del argv
    result = mask_times(FLAGS.vocab_size, tuple(int(r) for r in FLAGS.rows))
    print(f"vocab {result['vocab_size']}: token masks built in {result['build_ms']:.0f} ms")
    for key, row in result.items():
        if key.startswith("rows_"):
            print(
                f"{key[5:]:>4} rows: a step's masks median {row['median_us']:7.0f} us, "
                f"p90 {row['p90_us']:7.0f} us, max {row['max_us']:7.0f} us ({row['steps']} steps)"
            )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

"""What one customer's flood of requests does to the others' waits, by scheduling policy
(fcfs, fair shares, weighted fair shares), in engine steps on the tiny model (any machine).

    PYTHONPATH=. python scripts/bench_fairness.py --flood_requests=48 --json_out=fair.json
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.bench.fairness import FairnessScenario, fairness, format_table  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("flood_requests", 48, "requests the flooding tenant queues at once")
flags.DEFINE_integer("light_tenants", 3, "tenants that send a few requests each")
flags.DEFINE_integer("light_requests", 4, "requests of each light tenant")
flags.DEFINE_integer("max_batch", 4, "decode rows (the contended resource)")
flags.DEFINE_integer("output_len", 16, "tokens each request generates")
flags.DEFINE_string("json_out", None, "write the results here too")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    scenario = FairnessScenario(
        flood_requests=FLAGS.flood_requests,
        light_tenants=FLAGS.light_tenants,
        light_requests=FLAGS.light_requests,
        max_batch=FLAGS.max_batch,
        output_len=FLAGS.output_len,
    )
    result = fairness(scenario)
    print(format_table(result))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

"""Benchmark the SGMV shrink+expand kernels against two plain-JAX baselines (issue 3's grid).

What a row measures and how: jaxlora/bench/kernels.py.

    PYTHONPATH=. python scripts/bench_kernels.py --out_json=$OUT/bench.json
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora.bench import kernels  # noqa: E402
from jaxlora.config import parse_json  # noqa: E402
from jaxlora.errors import ConfigError, JaxloraError  # noqa: E402

DEFAULTS = kernels.KernelBenchConfig()
FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", [str(t) for t in DEFAULTS.tokens], "T values")
flags.DEFINE_list("outs", list(DEFAULTS.outs), "output groups: WIDTH or GxWIDTH")
flags.DEFINE_list("ranks", [str(r) for r in DEFAULTS.ranks], "adapter ranks")
flags.DEFINE_list("workloads", list(DEFAULTS.workloads), "workloads")
flags.DEFINE_list(
    "impls",
    list(DEFAULTS.impls),
    "implementations: sgmv (in place, sgmv_apply), sgmv_delta (the model's form: the float32 "
    "delta, added to y by one XLA fusion), gather_einsum, ragged_dot; 'sgmv:NAME' / "
    "'sgmv_delta:NAME' use --variants[NAME]",
)
flags.DEFINE_string("variants", "{}", "JSON {name: {SgmvConfig field: value}} for 'sgmv:NAME'")
flags.DEFINE_integer("hidden", DEFAULTS.hidden, "input width")
flags.DEFINE_integer("rows_per_page", DEFAULTS.rows_per_page, "rank-rows per page")
flags.DEFINE_integer("num_layers", DEFAULTS.num_layers, "layers in the pools")
flags.DEFINE_integer("calls", DEFAULTS.calls, "timed calls per implementation and row")
flags.DEFINE_float("slow_call_s", DEFAULTS.slow_call_s, "slower calls are timed once")
flags.DEFINE_float("copy_gib", DEFAULTS.copy_gib, "size of the copy-bandwidth buffers")
flags.DEFINE_integer("flush_mib", DEFAULTS.flush_mib, "size of the L2-flush buffer")
flags.DEFINE_integer("compile_threads", DEFAULTS.compile_threads, "parallel compilations")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke runs)")
flags.DEFINE_enum(
    "flush",
    DEFAULTS.flush,
    list(kernels.FLUSH_MODES),
    "L2 flush before each iteration: read (clean lines left in the L2) or write (dirty ones, "
    "as through the twenty-eighth session)",
)
flags.DEFINE_enum(
    "page_order",
    DEFAULTS.page_order,
    list(kernels.PAGE_ORDERS),
    "adapters' pages: shuffled, or in the order of each adapter's first token",
)
flags.DEFINE_string("out_json", "", "JSON output (default: $OUT/bench_kernels.json or ./)")


def _ints(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in getattr(FLAGS, name))
    except ValueError:
        raise ConfigError(f"--{name}: expected integers, got {getattr(FLAGS, name)}") from None


def main(argv):
    del argv
    out_json = FLAGS.out_json or os.path.join(os.environ.get("OUT", "."), "bench_kernels.json")
    try:
        config = kernels.KernelBenchConfig(
            tokens=_ints("tokens"),
            outs=tuple(FLAGS.outs),
            ranks=_ints("ranks"),
            workloads=tuple(FLAGS.workloads),
            impls=tuple(FLAGS.impls),
            variants=parse_json(FLAGS.variants, where="--variants"),
            hidden=FLAGS.hidden,
            rows_per_page=FLAGS.rows_per_page,
            num_layers=FLAGS.num_layers,
            calls=FLAGS.calls,
            slow_call_s=FLAGS.slow_call_s,
            copy_gib=FLAGS.copy_gib,
            flush_mib=FLAGS.flush_mib,
            compile_threads=FLAGS.compile_threads,
            interpret=FLAGS.interpret,
            page_order=FLAGS.page_order,
            flush=FLAGS.flush,
        )
        kernels.impl_steps(config)  # a bad impl or variant fails before anything is measured
    except JaxloraError as e:
        sys.exit(f"error: {e}")
    kernels.run(config, out_json)


if __name__ == "__main__":
    app.run(main)

"""Fifty-eighth session: where the engine's host time an iteration goes at the 7B shape.

Builds the serving section's engine (llama-2-7b shape, rank 16, bf16, the online defaults),
serves S-LoRA's trace (5 adapters) in-process once unprofiled, then once under cProfile (the
trace is stepped by this thread, so the profile holds every engine iteration), and prints the
functions by own time and the callees of the iteration's phases. cProfile's own cost inflates
Python-heavy functions; the shares, not the milliseconds, are the point.

    PYTHONPATH=. python3 docs/results/s58/host_profile.py [rate] [out_prefix] [model]
"""

import cProfile
import io
import logging
import pstats
import sys

from configs.models import get_model_preset
from jaxlora.bench.engine_setup import SetupConfig, build_engine
from jaxlora.bench.online import OnlineConfig, run_trace


def main(rate: float, out_prefix: str, model: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    config = OnlineConfig(
        adapter_counts=(5,),
        rate=rate,
        duration_s=30.0 if model != "tiny" else 3.0,
        drain_timeout_s=30.0,
    )
    setup = SetupConfig(dtype="bfloat16", rank=16, compile_threads=16)
    bench = build_engine(get_model_preset(model), config.engine_config(), setup)
    plain = run_trace(bench, config, 5)
    print("unprofiled:", {k: plain[k] for k in ("throughput_rps", "tpot_ms_median")})
    print("  wall ms/iteration", {k: round(v, 3) for k, v in plain["host_ms_per_step"].items()})
    print("  cpu  ms/iteration", {k: round(v, 3) for k, v in plain["host_cpu_ms_per_step"].items()})
    profile = cProfile.Profile()
    profile.enable()
    profiled = run_trace(bench, config, 5)
    profile.disable()
    profile.dump_stats(out_prefix + ".prof")
    print("profiled:", {k: profiled[k] for k in ("throughput_rps", "tpot_ms_median")})
    print("  wall ms/iteration", {k: round(v, 3) for k, v in profiled["host_ms_per_step"].items()})
    print(
        "  cpu  ms/iteration", {k: round(v, 3) for k, v in profiled["host_cpu_ms_per_step"].items()}
    )
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_callees(
        r"_launch|_dispatch_sampler|_complete|_schedule|_admit|_reap|run\b|_timed_run|_sample\b"
    )
    with open(out_prefix + ".txt", "w") as f:
        f.write(out.getvalue())
    print(out.getvalue()[:20000])


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 16.0,
        sys.argv[2] if len(sys.argv) > 2 else "host_profile",
        sys.argv[3] if len(sys.argv) > 3 else "llama-2-7b",
    )

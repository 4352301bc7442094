"""Fifty-seventh session: the OpenAI server's CPU time a streamed token, on the CPU machine.

The serving section's two passes (jaxlora.bench.serving) with the tiny model: the trace
stepped in-process, then through the server over HTTP (the client in its own process). The
CPU seconds of the server's thread (uvicorn's event loop: the handlers, the delta pump, the SSE
chunks and writes) over the HTTP pass, a streamed token: what the server takes of the
interpreter lock the engine's host work also needs.

    JAX_PLATFORMS=cpu PYTHONPATH=. python docs/results/s57/server_cpu.py [repeats] [interval]
"""

import logging
import sys
import time

from configs.models import TINY
from jaxlora.bench import online, serving
from jaxlora.bench.engine_setup import SetupConfig, build_engine
from jaxlora.bench.online import OnlineConfig


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    row = fn()
    return row, time.process_time() - cpu, time.perf_counter() - wall


def main(repeats: int, interval: int):
    logging.getLogger("jaxlora").setLevel(logging.WARNING)
    config = OnlineConfig(
        adapter_counts=(4,),
        rate=24.0,
        duration_s=4.0,
        drain_timeout_s=120.0,
        min_len=64,
        max_len=128,
        rank=8,
        max_batch=32,
        prefill_chunk=128,
        prefill_rows=4,
        resident_adapters=32,
        kv_pages=1024,
    )
    setup = SetupConfig(dtype="float32", rank=8, weight_sets=2, compile_threads=2)
    bench = build_engine(
        TINY, config.engine_config(), setup, tokenizer=serving.bench_tokenizer(TINY.vocab_size)
    )
    for i in range(repeats):
        engine_row, engine_cpu, engine_wall = timed(lambda: online.run_trace(bench, config, 4))
        http_row, http_cpu, http_wall = timed(
            lambda: serving.serve_http(
                bench, config, 4, variant=serving.ServerVariant(stream_interval=interval)
            )
        )
        tokens = http_row["output_tokens_per_s"] * http_row["elapsed_s"]
        print(
            f"run {i} (stream_interval {interval}): {tokens:.0f} tokens; in-process "
            f"{engine_cpu:.2f} s CPU ({engine_wall:.2f} s wall, "
            f"{engine_row['throughput_rps']:.2f} req/s); HTTP {http_cpu:.2f} s CPU "
            f"({http_wall:.2f} s wall, {http_row['throughput_rps']:.2f} req/s, TPOT "
            f"{http_row['tpot_ms_median']:.2f} ms against {engine_row['tpot_ms_median']:.2f}); "
            f"server thread {http_row['server_thread_cpu_s']:.2f} s CPU "
            f"({http_row['server_cpu_us_per_token']:.1f} us a token), engine thread "
            f"{http_row['engine_thread_cpu_s']:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, int(sys.argv[2]) if len(sys.argv) > 2 else 1)

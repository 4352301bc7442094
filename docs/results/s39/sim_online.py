"""Virtual-time replay of the online trace (thirty-ninth session; a study, not a benchmark).

The real engine (tiny model, on the CPU) schedules S-LoRA's synthetic trace; each step it runs
advances a virtual clock by a modelled H100 cost of the llama-2-7b step it stands for: the
decode roofline's bytes at 3,070 GB/s, the base part x1.15 and the adapter part x1.74 (the
thirty-eighth session's async iterations over the roofline at batch 64 and the LoRA cost),
prefill at 450 TFLOP/s. Only the scheduling is real; the absolute rates are a model.

    PYTHONPATH=. python docs/results/s39/sim_online.py SLOTS[,SLOTS] SKIPS COUNTS RATE
    e.g. PYTHONPATH=. python docs/results/s39/sim_online.py 64,16 8 5,2000 24
"""

import sys
import time as real_time
import types

import jaxlora.bench.online as online_module
import jaxlora.engine.engine as engine_module
from configs.models import TINY, get_model_preset
from jaxlora.bench import roofline
from jaxlora.bench.engine_setup import SetupConfig, build_engine
from jaxlora.bench.online import OnlineConfig, run_online

clock = [0.0]
virtual_time = types.SimpleNamespace(
    monotonic=lambda: clock[0],
    perf_counter=real_time.perf_counter,
    sleep=lambda s: clock.__setitem__(0, clock[0] + s),
)
engine_module.time = virtual_time
online_module.time = virtual_time

LLAMA = get_model_preset("llama-2-7b")
COPY_BYTES_PER_S = 3.07e12


def modelled_seconds(record) -> float:
    adapters = sum(roofline.adapter_bytes(LLAMA, 2, ranks) for ranks in record.slot_ranks)
    if record.mode == "decode":
        step = roofline.decode_step_bytes(
            LLAMA, 2, seq_lens=record.seq_lens, adapter_ranks=record.slot_ranks
        )
        base = (step.weights + step.kv_read) / COPY_BYTES_PER_S * 1.15
        return base + adapters / COPY_BYTES_PER_S * 1.74 + 0.3e-3
    flops = sum(record.seq_lens) * 13.4e9
    base = max(flops / 450e12, 13.5e9 / COPY_BYTES_PER_S)
    return base + adapters / COPY_BYTES_PER_S * 1.74 + 0.5e-3


def main(argv):
    slots = [int(x) for x in argv[1].split(",")]
    skips = int(argv[2]) if len(argv) > 2 else 8
    counts = tuple(int(x) for x in (argv[3] if len(argv) > 3 else "5,2000").split(","))
    rate = float(argv[4]) if len(argv) > 4 else 24.0
    for max_slots in slots:
        config = OnlineConfig(
            adapter_counts=counts,
            rate=rate,
            duration_s=20,
            drain_timeout_s=20,
            rank=16,
            max_batch=64,
            max_slots=max_slots,
            max_skips=skips,
            resident_adapters=96,
            kv_pages=3000,
        )
        setup = SetupConfig(dtype="float32", rank=16, weight_sets=2, compile_threads=4)
        bench = build_engine(TINY, config.engine_config(), setup)
        timer, run_step, take = bench.timer, bench.engine.step, bench.timer.take
        seen = [0]

        def step(timer=timer, run_step=run_step, seen=seen):
            out = run_step()
            for record in timer.records[seen[0] :]:
                clock[0] += modelled_seconds(record)
            seen[0] = len(timer.records)
            return out

        def take_records(take=take, seen=seen):
            seen[0] = 0
            return take()

        bench.engine.step = step
        timer.take = take_records
        for row in run_online(bench, config)["rows"]:
            print(
                f"slots={max_slots} skips={skips} n={row['num_adapters']}: "
                f"{row['throughput_rps']:.2f} req/s {row['output_tokens_per_s']:.0f} tok/s "
                f"rows/decode {row['decode_rows_mean']:.1f} "
                f"adapters/decode {row['adapters_per_decode_step_mean']:.1f} "
                f"ttft p50 {row['ttft_p50_s']:.2f} p99 {row['ttft_p99_s']:.2f} "
                f"slo {100 * row['slo_attainment']:.1f}% unfinished {row['unfinished']}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv)

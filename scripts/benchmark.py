"""End-to-end benchmark of the engine on a GPU (in-process): offline throughput against the decode
roofline, and S-LoRA's synthetic online trace. See docs/BENCHMARKS.md for the results.

    PYTHONPATH=. python scripts/benchmark.py --section=offline --json_out=$OUT/offline.json
    PYTHONPATH=. python scripts/benchmark.py --section=online --online_rate=6 \\
        --json_out=$OUT/online.json
    PYTHONPATH=. python scripts/benchmark.py --section=online --online_prefix_len=1024 \\
        --online_prefix_caching=off,on --online_max_len=256 --json_out=$OUT/prefix.json
    PYTHONPATH=. python scripts/bench_peft.py --json_out=$OUT/peft.json
    PYTHONPATH=. python scripts/benchmark.py --section=report \\
        --inputs=$OUT/offline.json,$OUT/online.json,$OUT/peft.json --figure_out=$OUT/bench.png

The copy bandwidth of the roofline is measured in the same process by the kernel benchmark's
copy-ceiling measurement (jaxlora.bench.kernels.copy_ceiling); with system prompts
(--online_prefix_len) the matmul rate of the prefill floor too (kernels.matmul_ceiling).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

# The offline run holds the weights, a KV cache for 128 sequences and a pool of 128 adapters:
# more than JAX's default 75% of the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.93")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs.models import get_model_preset  # noqa: E402
from jaxlora.bench import kernels, report  # noqa: E402
from jaxlora.bench.engine_setup import SetupConfig, build_engine  # noqa: E402
from jaxlora.bench.offline import OfflineConfig, run_offline  # noqa: E402
from jaxlora.bench.online import OnlineConfig, run_online  # noqa: E402
from jaxlora.bench.serving import bench_tokenizer, run_serving, server_variants  # noqa: E402
from jaxlora.bench.workloads import WORKLOADS  # noqa: E402
from jaxlora.config import parse_positive_ints  # noqa: E402
from jaxlora.engine import EngineConfig  # noqa: E402
from jaxlora.engine.kv_cache import KV_CACHE_DTYPES  # noqa: E402
from jaxlora.engine.runner import xla_options_from_json  # noqa: E402
from jaxlora.errors import ConfigError, JaxloraError  # noqa: E402
from pallas_kernels.lora_matmul import MatmulConfig  # noqa: E402
from pallas_kernels.sgmv import SgmvConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "section",
    "offline",
    ["offline", "online", "serving", "report"],
    "what to run (serving: the online trace in-process, then through the OpenAI server over "
    "HTTP with its client in another process; the --online_* flags set both)",
)
flags.DEFINE_string("model", "llama-2-7b", "model preset (configs/models.py)")
flags.DEFINE_integer(
    "model_layers",
    0,
    "layers of the model (0: the preset's); fewer layers "
    "compile faster for a quick per-layer profile, but the roofline rows are "
    "only comparable at the preset's depth",
)
flags.DEFINE_list(
    "free_running",
    ["async", "sync"],
    "offline: after the timed pass, each row "
    "is served again untimed once per scheduling mode listed (async, sync); the "
    "first gives its tokens/s; empty: the timed pass's",
)
flags.DEFINE_string(
    "xla_options",
    "{}",
    "JSON {XLA compiler option: value} for the engine's model step (RunnerConfig.xla_options)",
)
flags.DEFINE_enum(
    "xla_gemms",
    "auto",
    ["auto", "cublas", "autotuned"],
    "XLA's own GEMMs in the model step: cuBLAS, or XLA's autotuned choice (mostly Triton "
    "fusions); auto: cuBLAS on the Pallas kernels (RunnerConfig.xla_gemms)",
)
flags.DEFINE_string(
    "sgmv_config",
    "{}",
    "JSON {SgmvConfig field: value} for the engine's SGMV "
    "kernels, e.g. '{\"decode_max_tokens\": 32}' (per-token expand up to 32 rows)",
)
flags.DEFINE_string(
    "matmul_config",
    "{}",
    "JSON {MatmulConfig field: value} for the engine's lora_matmul decode projections, e.g. "
    "'{\"expand_block_m\": 32}' (row blocks of 32 tokens with the LoRA epilogue)",
)
flags.DEFINE_integer(
    "profile_steps",
    0,
    "offline: engine iterations per row traced with the JAX "
    "profiler once the batch decodes (a per-kernel breakdown in the row's "
    "'profile'); 0: none",
)
flags.DEFINE_string(
    "dtype", "bfloat16", "weights, adapter pool and KV cache (see --kv_cache_dtype) dtype"
)
flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    list(KV_CACHE_DTYPES),
    "the KV cache's dtype (KVCacheConfig.cache_dtype, vLLM's --kv-cache-dtype): auto = --dtype; "
    "an fp8 format halves bf16's KV bytes (the roofline counts them at 1 byte)",
)
flags.DEFINE_integer("rank", 16, "adapter rank (all 7 modules)")
flags.DEFINE_integer(
    "weight_sets",
    4,
    "distinct adapter weight sets held in host memory; "
    "adapter i uses set i mod this (jaxlora/bench/adapters.py)",
)
flags.DEFINE_integer("seed", 0, "seed of weights, prompts and traces")
flags.DEFINE_bool(
    "freeze_heap",
    True,
    "serve each offline row and online trace with the objects alive before it frozen out of "
    "Python's garbage collector (gc.freeze), as serve.py serves once warm",
)
flags.DEFINE_list(
    "serving_stream_interval",
    ["1"],
    "serving: the server's --stream_interval (tokens a streamed chunk carries at least); "
    "several: one HTTP pass each (and each --serving_switch_interval_ms)",
)
flags.DEFINE_bool(
    "serving_in_process",
    True,
    "serving: also serve each trace in-process, the HTTP passes' baseline; false: the HTTP "
    "passes alone",
)
flags.DEFINE_list(
    "serving_switch_interval_ms",
    ["0"],
    "serving: the server's --switch_interval_ms (the interpreter's thread switch interval; 0: "
    "Python's own, 5 ms); several: one HTTP pass each",
)
flags.DEFINE_float("copy_bandwidth_gbps", 0.0, "roofline bandwidth; 0: measure it")
flags.DEFINE_float("copy_gib", 1.0, "size of the copy-bandwidth buffers")
flags.DEFINE_integer("flush_mib", 256, "size of the L2-flush buffer of the copy measurement")
flags.DEFINE_float(
    "matmul_tflops",
    0.0,
    "serving, and online with --online_prefix_len: the matmul rate of the prefill floor; 0: "
    "measure it",
)
flags.DEFINE_integer("matmul_size", 8192, "the matmul-rate measurement's square operands")
flags.DEFINE_integer("compile_threads", 16, "parallel compilations of the engine's step shapes")
flags.DEFINE_enum(
    "impl",
    "auto",
    ["auto", "pallas", "reference"],
    "attention / LoRA kernels (auto: Pallas on GPU)",
)
flags.DEFINE_bool(
    "deterministic",
    True,
    "the same bits on every run: no atomic adds in a step; the LoRA shrink's split reduction "
    "is summed in one fixed order (RunnerConfig.deterministic). --nodeterministic: atomic adds.",
)
flags.DEFINE_enum(
    "kv_write",
    "pallas",
    ["xla", "pallas"],
    "who rotates q, k and writes K/V into the paged cache: one Pallas launch a layer or XLA's "
    "fusions and scatters (RunnerConfig.kv_write)",
)
flags.DEFINE_enum(
    "lora_update",
    "in_place",
    ["in_place", "delta"],
    "how the SGMV expand updates the outputs of XLA's GEMMs (prefill, decode steps past "
    "lora_matmul's rows): in place, or a float32 delta XLA adds (RunnerConfig.lora_update)",
)
flags.DEFINE_enum(
    "prefill_attention",
    "auto",
    ["auto", "xla", "cudnn"],
    "the prefill chunks' one-pass attention: XLA's or cuDNN's fused attention (bf16 on a GPU; "
    "auto: cuDNN's for heads of at most 128; RunnerConfig.prefill_attention)",
)
flags.DEFINE_enum(
    "residual_norm",
    "pallas",
    ["xla", "pallas"],
    "who adds o's and down's outputs into the residual stream and runs the RMSNorms after "
    "them in decode steps where lora_matmul runs every projection: XLA's fusions or two "
    "Pallas launches a layer (RunnerConfig.residual_norm)",
)
flags.DEFINE_integer(
    "residual_norm_warps", 16, "num_warps of the residual_norm kernel (RunnerConfig)"
)
flags.DEFINE_bool(
    "norm_shrink",
    False,
    "run the q|k|v and gate|up LoRA shrinks of SGMV decode steps in the residual-norm "
    "launches (RunnerConfig.norm_shrink; needs --residual_norm=pallas)",
)
flags.DEFINE_bool(
    "swiglu_shrink",
    False,
    "run SwiGLU and down's LoRA shrink of those decode steps in one launch "
    "(RunnerConfig.swiglu_shrink; needs --residual_norm=pallas)",
)
flags.DEFINE_bool(
    "attention_shrink",
    False,
    "run o's LoRA shrink of those decode steps in the attention launch where it has one kv "
    "split (RunnerConfig.attention_shrink)",
)
flags.DEFINE_integer(
    "fused_shrink_rows", 8, "rank rows a program of those launches (RunnerConfig.fused_shrink_rows)"
)
flags.DEFINE_enum(
    "layer_loop", "scan", ["scan", "unrolled"], "the step's layer loop (RunnerConfig.layer_loop)"
)
flags.DEFINE_integer(
    "scan_unroll",
    None,
    "layers per iteration of the scan layer loop (RunnerConfig.scan_unroll; default: per step, "
    "2 where lora_matmul runs every projection, else 1)",
)
flags.DEFINE_bool(
    "fuse_projections",
    True,
    "one GEMM for q|k|v and one for gate|up (RunnerConfig.fuse_projections)",
)
flags.DEFINE_enum(
    "projection_kernel",
    "auto",
    ["auto", "xla", "pallas"],
    "decode projections: XLA's GEMMs + SGMV delta, or pallas_kernels.lora_matmul (base GEMM and "
    "LoRA expand in one launch); auto: lora_matmul with the scan layer loop on a GPU "
    "(RunnerConfig.projection_kernel)",
)
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64", "128"], "offline batch sizes")
flags.DEFINE_list("offline_workloads", list(WORKLOADS), "offline adapter workloads")
flags.DEFINE_integer("prompt_len", 256, "offline prompt tokens")
flags.DEFINE_integer("output_len", 128, "offline output tokens")
flags.DEFINE_integer(
    "max_model_len",
    None,
    "offline engines' context length, the page tables' width (default prompt_len + "
    "output_len; a server's is 4096): what a prefill step's attention reads, cut by "
    "--prefill_context_buckets",
)
flags.DEFINE_list(
    "prefill_context_buckets",
    None,
    "contexts (keys) prefill page tables are cut to (default RunnerConfig's 512,2048,4096, then "
    "doubling to 65536; empty: the whole table; RunnerConfig.prefill_context_buckets)",
)
flags.DEFINE_integer("skewed_adapters", 1000, "adapters of the skewed workload (Zipf 1)")
flags.DEFINE_integer("prefill_rows", 8, "offline prompts prefilled per step")
flags.DEFINE_float("offline_time_budget_s", 0.0, "rows starting later are not run; 0: none")
flags.DEFINE_list("online_adapters", ["5", "100", "1000", "2000"], "adapters per trace")
flags.DEFINE_float("online_rate", 4.0, "requests per second")
flags.DEFINE_float("online_duration_s", 60.0, "arrival span of each trace")
flags.DEFINE_float(
    "online_drain_s",
    60.0,
    "after the last arrival, unfinished requests are cancelled after this long",
)
flags.DEFINE_float("online_alpha", 1.0, "adapter popularity exponent")
flags.DEFINE_float("online_cv", 1.0, "inter-arrival coefficient of variation (1: Poisson)")
flags.DEFINE_enum("online_popularity", "slora", ["slora", "zipf"], "popularity law")
flags.DEFINE_integer("online_min_len", 8, "shortest prompt / output")
flags.DEFINE_integer("online_max_len", 512, "longest prompt / output")
flags.DEFINE_integer(
    "online_prefix_len",
    0,
    "tokens of each adapter's system prompt that its requests' prompts start with (0: none)",
)
flags.DEFINE_list(
    "online_prefix_caching",
    ["off"],
    "each trace is served once per mode listed (off, on): prefix caching on one compiled engine",
)
flags.DEFINE_float("slo_s", 6.0, "first-token objective")
flags.DEFINE_integer("online_max_batch", 64, "decode rows per step")
flags.DEFINE_integer(
    "online_max_slots",
    0,
    "distinct adapters one step may use (vLLM's --max-loras); 0: online_max_batch",
)
flags.DEFINE_integer(
    "online_max_skips",
    EngineConfig.max_skips,
    "how often a waiting request may be overtaken (EngineConfig.max_skips)",
)
flags.DEFINE_integer("online_prefill_chunk", 256, "prompt tokens per prefill row")
flags.DEFINE_integer("online_prefill_rows", 4, "prompts prefilled per step")
flags.DEFINE_integer("online_resident_adapters", 96, "adapters the GPU pool holds")
flags.DEFINE_integer("online_kv_pages", 3000, "KV cache pages of 16 tokens")
flags.DEFINE_bool(
    "online_time_steps",
    False,
    "online: wait for and time every model step "
    "(the device then waits for the host); default: the engine runs as it serves",
)
flags.DEFINE_list("inputs", [], "report: result JSON files to merge")
flags.DEFINE_string("json_out", "", "results (default: $OUT/<section>.json or ./)")
flags.DEFINE_string("figure_out", "", "report: PNG figure path")
flags.DEFINE_string("markdown_out", "", "report: markdown tables path (also printed)")


def measure_copy_gbps() -> tuple[float, dict]:
    """The copy ceiling of the roofline (jaxlora.bench.kernels.copy_ceiling), or the one given."""
    if FLAGS.copy_bandwidth_gbps > 0:
        return FLAGS.copy_bandwidth_gbps, {"given": FLAGS.copy_bandwidth_gbps}
    return kernels.copy_ceiling(copy_gib=FLAGS.copy_gib, flush_mib=FLAGS.flush_mib)


def measure_matmul_tflops() -> tuple[float, dict]:
    """The matmul rate of the prefill floor (jaxlora.bench.kernels.matmul_ceiling), or the one
    given."""
    if FLAGS.matmul_tflops > 0:
        return FLAGS.matmul_tflops, {"given": FLAGS.matmul_tflops}
    return kernels.matmul_ceiling(size=FLAGS.matmul_size)


def prefix_caching_modes(values) -> tuple[bool, ...]:
    modes = {"off": False, "on": True}
    bad = [v for v in values if v not in modes]
    if bad or not values:
        raise ConfigError(
            f"--online_prefix_caching: expected off and / or on, got {','.join(values)!r}"
        )
    return tuple(modes[v] for v in values)


def section_config(prefix_caching: tuple[bool, ...]):
    """The offline or online section's config from the flags (ConfigError names a bad one)."""
    if FLAGS.section == "offline":
        return OfflineConfig(
            batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes),
            workloads=tuple(FLAGS.offline_workloads),
            prompt_len=FLAGS.prompt_len,
            output_len=FLAGS.output_len,
            rank=FLAGS.rank,
            skewed_adapters=FLAGS.skewed_adapters,
            prefill_rows=FLAGS.prefill_rows,
            impl=FLAGS.impl,
            layer_loop=FLAGS.layer_loop,
            fuse_projections=FLAGS.fuse_projections,
            projection_kernel=FLAGS.projection_kernel,
            kv_cache_dtype=FLAGS.kv_cache_dtype,
            profile_steps=FLAGS.profile_steps,
            free_running=tuple(FLAGS.free_running),
            freeze_heap=FLAGS.freeze_heap,
            seed=FLAGS.seed,
            max_model_len=FLAGS.max_model_len,
        )
    return OnlineConfig(
        adapter_counts=tuple(int(n) for n in FLAGS.online_adapters),
        rate=FLAGS.online_rate,
        duration_s=FLAGS.online_duration_s,
        drain_timeout_s=FLAGS.online_drain_s,
        alpha=FLAGS.online_alpha,
        cv=FLAGS.online_cv,
        popularity=FLAGS.online_popularity,
        min_len=FLAGS.online_min_len,
        max_len=FLAGS.online_max_len,
        prefix_len=FLAGS.online_prefix_len,
        prefix_caching=prefix_caching,
        slo_s=FLAGS.slo_s,
        rank=FLAGS.rank,
        max_batch=FLAGS.online_max_batch,
        max_slots=FLAGS.online_max_slots or None,
        max_skips=FLAGS.online_max_skips,
        prefill_chunk=FLAGS.online_prefill_chunk,
        prefill_rows=FLAGS.online_prefill_rows,
        resident_adapters=FLAGS.online_resident_adapters,
        kv_pages=FLAGS.online_kv_pages,
        impl=FLAGS.impl,
        layer_loop=FLAGS.layer_loop,
        fuse_projections=FLAGS.fuse_projections,
        projection_kernel=FLAGS.projection_kernel,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        time_steps=FLAGS.online_time_steps,
        freeze_heap=FLAGS.freeze_heap,
        seed=FLAGS.seed,
    )


def meta(copy_gbps: float, copy_methods: dict, setup_seconds: dict, model) -> dict:
    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "jax": jax.__version__,
        "model": dataclasses.asdict(model),
        "dtype": FLAGS.dtype,
        "rank": FLAGS.rank,
        "weight_sets": FLAGS.weight_sets,
        "copy_GBps": copy_gbps,
        "copy_methods": copy_methods,
        "setup_seconds": setup_seconds,
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def output_path() -> str:
    return FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), f"{FLAGS.section}.json")


def main(argv):
    del argv
    logging.getLogger("jaxlora").setLevel(logging.INFO)
    if FLAGS.section == "report":
        try:
            results = report.load(FLAGS.inputs)
        except JaxloraError as e:
            sys.exit(f"error: {e}")
        text = report.markdown(results)
        print(text)
        if FLAGS.markdown_out:
            with open(FLAGS.markdown_out, "w") as f:
                f.write(text)
        if FLAGS.figure_out and not report.plot(results, FLAGS.figure_out):
            print("matplotlib is not installed (pip install -e .[bench]): no figure")
        return
    try:  # a bad flag fails before the copy-bandwidth measurement, not after
        sgmv = SgmvConfig.from_json(
            FLAGS.sgmv_config or "{}",
            where="--sgmv_config",
            set_elsewhere={"deterministic": "--[no]deterministic"},
        )
        matmul = MatmulConfig.from_json(FLAGS.matmul_config or "{}", where="--matmul_config")
        xla_options = xla_options_from_json(FLAGS.xla_options, where="--xla_options")
        config = section_config(prefix_caching_modes(FLAGS.online_prefix_caching))
        variants = server_variants(FLAGS.serving_stream_interval, FLAGS.serving_switch_interval_ms)
        model = get_model_preset(FLAGS.model)
        if FLAGS.model_layers:
            model = dataclasses.replace(model, num_layers=FLAGS.model_layers)
        setup = SetupConfig(
            dtype=FLAGS.dtype,
            rank=FLAGS.rank,
            weight_sets=FLAGS.weight_sets,
            compile_threads=FLAGS.compile_threads,
            seed=FLAGS.seed,
        )
    except JaxloraError as e:
        sys.exit(f"error: {e}")
    print("devices:", jax.devices(), flush=True)
    copy_gbps, copy_methods = measure_copy_gbps()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    matmul_tflops = matmul_method = None
    if FLAGS.section == "serving" or (FLAGS.section == "online" and FLAGS.online_prefix_len > 0):
        matmul_tflops, matmul_method = measure_matmul_tflops()
        print(f"matmul rate: {matmul_tflops:.0f} TFLOP/s", flush=True)
    engine_config = config.engine_config()
    engine_config = dataclasses.replace(
        engine_config,
        runner=dataclasses.replace(
            engine_config.runner,
            sgmv=sgmv,
            matmul=matmul,
            xla_options=xla_options,
            xla_gemms=FLAGS.xla_gemms,
            kv_write=FLAGS.kv_write,
            lora_update=FLAGS.lora_update,
            prefill_attention=FLAGS.prefill_attention,
            prefill_context_buckets=(
                engine_config.runner.prefill_context_buckets
                if FLAGS.prefill_context_buckets is None
                else parse_positive_ints(
                    FLAGS.prefill_context_buckets, flag="--prefill_context_buckets"
                )
            ),
            residual_norm=FLAGS.residual_norm,
            residual_norm_warps=FLAGS.residual_norm_warps,
            norm_shrink=FLAGS.norm_shrink,
            swiglu_shrink=FLAGS.swiglu_shrink,
            fused_shrink_rows=FLAGS.fused_shrink_rows,
            attention_shrink=FLAGS.attention_shrink,
            scan_unroll=FLAGS.scan_unroll,
            deterministic=FLAGS.deterministic,
        ),
    )
    tokenizer = bench_tokenizer(model.vocab_size) if FLAGS.section == "serving" else None
    bench = build_engine(model, engine_config, setup, tokenizer=tokenizer)
    print(f"engine ready: {json.dumps(bench.setup_seconds)}", flush=True)
    doc = {"meta": meta(copy_gbps, copy_methods, bench.setup_seconds, model)}
    doc["meta"]["adapter_host_bytes"] = bench.adapters.host_bytes
    if matmul_tflops is not None:
        doc["meta"]["matmul_TFLOPs"] = matmul_tflops
        doc["meta"]["matmul_method"] = matmul_method
    doc["meta"]["step_compiler_options"] = bench.engine.runner.compiler_options
    path = output_path()

    def checkpoint():
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    section = FLAGS.section
    doc[section] = {"rows": []}

    def on_row(rows):  # (each row written as soon as it is measured)
        doc[section].update(rows=rows)
        checkpoint()

    if section == "offline":
        budget = FLAGS.offline_time_budget_s or None
        doc[section] = run_offline(bench, config, copy_gbps, time_budget_s=budget, on_row=on_row)
    elif section == "serving":
        doc[section] = run_serving(
            bench,
            config,
            on_row=on_row,
            copy_gbps=copy_gbps,
            matmul_tflops=matmul_tflops,
            variants=variants,
            in_process=FLAGS.serving_in_process,
        )
    else:
        doc[section] = run_online(
            bench, config, on_row=on_row, copy_gbps=copy_gbps, matmul_tflops=matmul_tflops
        )
    checkpoint()
    print(report.markdown(doc), flush=True)
    print("wrote", path, flush=True)


if __name__ == "__main__":
    app.run(main)

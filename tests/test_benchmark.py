"""The benchmark logic (jaxlora/bench, scripts/benchmark.py) on the tiny model, on CPU: workloads
and traces, roofline byte counts, aliased adapters, offline rows, an online trace, the report."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.bench import profile, report, roofline
from jaxlora.bench.adapters import AdapterPopulation, make_store
from jaxlora.bench.engine_setup import SetupConfig, build_engine
from jaxlora.bench.offline import OfflineConfig, run_offline
from jaxlora.bench.online import OnlineConfig, run_online, run_trace
from jaxlora.bench.workloads import (
    WORKLOADS,
    TraceConfig,
    adapter_name,
    assign_adapters,
    offline_prompts,
    synthetic_trace,
    system_prompt,
    trace_prompt,
)
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import Engine, EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.errors import ConfigError
from jaxlora.lora import random_lora_weights
from jaxlora.memory import AdapterManager, AdapterManagerConfig
from jaxlora.model import init_params
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(script: str, *args: str, timeout: int = 120, check: bool = False):
    """scripts/<script> with ``args`` in a subprocess on the CPU, its output captured as text."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


SETUP = SetupConfig(dtype="float32", rank=8, weight_sets=2, compile_threads=2)


def test_workloads_assign_the_documented_adapter_counts():
    assert assign_adapters("no_lora", 4) == [None] * 4
    assert assign_adapters("identical", 5) == [0] * 5
    assert assign_adapters("distinct", 6) == list(range(6))
    uniform = assign_adapters("uniform", 64, seed=3)
    assert sorted(np.bincount(uniform)) == [8] * 8  # sqrt(64) adapters, equal shares
    skewed = assign_adapters("skewed", 2000, seed=1, skewed_adapters=1000)
    assert all(0 <= i < 1000 for i in skewed)
    counts = np.bincount(skewed, minlength=1000)
    assert counts[0] > 5 * counts[10:20].mean()  # Zipf: the head dominates
    assert assign_adapters("skewed", 50, seed=2) == assign_adapters("skewed", 50, seed=2)
    with pytest.raises(ConfigError, match="workload 'mixed'"):
        assign_adapters("mixed", 4)
    prompts = offline_prompts(3, 7, 100, seed=0)
    assert prompts.shape == (3, 7) and prompts.min() >= 3 and prompts.max() < 100
    assert np.array_equal(prompts, offline_prompts(3, 7, 100, seed=0))


def test_synthetic_trace_follows_its_config():
    config = TraceConfig(num_adapters=50, rate=20.0, duration_s=200.0, seed=4)
    trace = synthetic_trace(config)
    arrivals = np.array([r.arrival_s for r in trace])
    assert np.all(np.diff(arrivals) > 0) and arrivals[-1] < 200.0
    assert abs(len(trace) / 4000 - 1) < 0.1  # Poisson: rate x duration requests
    gaps = np.diff(arrivals)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # cv 1
    for field in ("prompt_len", "output_len"):
        lengths = np.array([getattr(r, field) for r in trace])
        assert lengths.min() == 8 and lengths.max() == 512
    # S-LoRA's power law with alpha 1 gives every adapter the same popularity ...
    shares = np.bincount([r.adapter for r in trace], minlength=50) / len(trace)
    assert shares.max() < 0.04 and shares.min() > 0.005
    # ... smaller alpha, or a Zipf popularity, concentrate the requests on few adapters.
    skewed = synthetic_trace(dataclasses.replace(config, alpha=0.3))
    assert np.mean([r.adapter < 5 for r in skewed]) > 0.4
    zipf = synthetic_trace(dataclasses.replace(config, popularity="zipf"))
    assert np.mean([r.adapter == 0 for r in zipf]) > 0.15
    assert synthetic_trace(config) == trace
    with pytest.raises(ConfigError, match="'max_len'"):
        TraceConfig(num_adapters=5, rate=1.0, duration_s=1.0, min_len=10, max_len=9)
    with pytest.raises(ConfigError, match="'popularity'"):
        TraceConfig(num_adapters=5, rate=1.0, duration_s=1.0, popularity="pareto")


def test_trace_prompts_start_with_their_adapter_s_system_prompt():
    config = TraceConfig(num_adapters=3, rate=50.0, duration_s=2.0, prefix_len=20, seed=2)
    trace = synthetic_trace(config)
    assert trace == synthetic_trace(dataclasses.replace(config, prefix_len=0))  # same requests
    prefixes = {a: system_prompt(a, 20, 100, seed=2) for a in range(3)}
    assert len({tuple(p) for p in prefixes.values()}) == 3
    assert all(3 <= t < 100 for p in prefixes.values() for t in p)
    for item in trace[:20]:
        prompt = trace_prompt(item, 100, seed=2, prefix_len=20)
        assert len(prompt) == 20 + item.prompt_len
        assert prompt[:20] == prefixes[item.adapter]
        assert prompt[20:] == trace_prompt(item, 100, seed=2)  # its own tokens, as without
    assert system_prompt(0, 20, 100, seed=3) != prefixes[0]
    for bad in (-1, True, 2.0):
        with pytest.raises(ConfigError, match="'prefix_len'"):
            TraceConfig(num_adapters=3, rate=1.0, duration_s=1.0, prefix_len=bad)


def test_prefill_flops_count_projections_attention_and_the_lm_head():
    params = init_params(TINY, 0, dtype=jnp.float32)
    projections = sum(
        x.size
        for path, x in jax.tree_util.tree_leaves_with_path(params["layers"])
        if "kernel" in jax.tree_util.keystr(path)
    )
    lm_head = params["lm_head"]["kernel"].size
    attention = 4 * TINY.num_layers * TINY.num_heads * TINY.head_dim  # a query's FLOPs a key
    # Positions 0..9 see 1..10 keys; 10..12 see 11..13 more; an empty span computes nothing.
    assert roofline.prefill_flops(TINY, [(0, 10)]) == 2 * projections * 10 + attention * 55 + (
        2 * lm_head
    )
    assert roofline.prefill_flops(TINY, [(0, 10), (10, 13), (5, 5)]) == (
        2 * projections * 13 + attention * (55 + 11 + 12 + 13) + 2 * 2 * lm_head
    )
    # Positions 2..6 see 3, 4, 4, 4, 4 keys in a window of 4 (Mistral's, every layer) ...
    windowed = dataclasses.replace(TINY, model_type="mistral", sliding_window=4)
    assert roofline.prefill_flops(windowed, [(2, 7)]) == (
        2 * projections * 5 + attention * (3 + 4 + 4 + 4 + 4) + 2 * lm_head
    )
    # ... or in Gemma 2's sliding layer (the first of two; the second sees 3..7 keys).
    gemma = dataclasses.replace(TINY, model_type="gemma2", local_window=4, sliding_period=2)
    per_layer = attention // TINY.num_layers
    assert roofline.prefill_flops(gemma, [(2, 7)]) == (
        2 * projections * 5 + per_layer * (19 + 25) + 2 * lm_head
    )
    assert roofline.prefill_flops(gemma, [(0, 3)]) == roofline.prefill_flops(TINY, [(0, 3)])


def test_matmul_ceiling_times_chained_products():
    from jaxlora.bench.kernels import matmul_ceiling

    tflops, method = matmul_ceiling(size=64, chain=3, calls=2)
    assert math.isfinite(tflops) and tflops > 0
    assert method["size"] == 64 and method["chain"] == 3 and method["dtype"] == "bfloat16"
    assert tflops == pytest.approx(2 * 64**3 * 3 / (method["ms_per_product"] * 3e-3) / 1e12)
    with pytest.raises(ConfigError, match="matmul_ceiling"):
        matmul_ceiling(size=0)


def test_kv_tokens_read_counts_each_shared_page_once():
    table = np.array([[5, 6, 7, 0], [5, 6, 9, 0], [1, 2, 3, 4]], np.int32)
    # Rows of 40 and 35 tokens sharing their first two pages; a padding row reads nothing.
    assert roofline.kv_tokens_read([40, 35, 0], table, 16) == 16 + 16 + 8 + 3
    # A page both rows read in part (8 and 3 tokens) counts its larger part.
    assert roofline.kv_tokens_read([40, 35], table[:2][:, [0, 2, 1, 3]], 16) == 16 * 3 + 8
    assert roofline.kv_tokens_read([40, 35, 0], [[1, 2, 3, 0], [4, 5, 6, 0], [0] * 4], 16) == 75
    # A window of 20 keys: the last 20 positions of each row (pages before it are not read).
    assert roofline.kv_tokens_read([40], table[:1], 16, window=20) == 12 + 8
    assert roofline.kv_tokens_read([0, 0], table[:2], 16) == 0
    per_row = roofline.decode_step_bytes(TINY, 2, seq_lens=[40, 35], adapter_ranks=[])
    shared = roofline.decode_step_bytes(TINY, 2, seq_lens=[40, 35], adapter_ranks=[], kv_tokens=43)
    assert shared.weights == per_row.weights
    assert shared.kv_read == per_row.kv_read * 43 // 75


def test_roofline_counts_every_weight_and_adapter_byte():
    params = init_params(TINY, 0, dtype=jnp.bfloat16)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    embedding = TINY.vocab_size * TINY.hidden_size * 2
    for rows in (1, 7):
        # A step reads all weights but gathers only its rows of the (untied) embedding table.
        assert roofline.base_weight_bytes(TINY, 2, rows) == (
            total - embedding + rows * TINY.hidden_size * 2
        )
    weights = random_lora_weights(TINY, "w", 8, MODULES, dtype=np.float32)
    assert roofline.adapter_bytes(TINY, 4, (8,) * 7) == weights.nbytes
    partial = random_lora_weights(TINY, "p", 4, ("q_proj", "down_proj"), dtype=np.float32)
    assert roofline.adapter_bytes(TINY, 4, (4, 0, 0, 0, 0, 0, 4)) == partial.nbytes
    kv = roofline.kv_read_bytes(TINY, 2, [10, 5])
    assert kv == 15 * TINY.num_layers * 2 * TINY.kv_size * 2
    step = roofline.decode_step_bytes(TINY, 2, seq_lens=[10, 5], adapter_ranks=[(8,) * 7] * 3)
    assert step.total == (
        roofline.base_weight_bytes(TINY, 2, 2) + kv + 3 * roofline.adapter_bytes(TINY, 2, (8,) * 7)
    )
    assert step.seconds(1.0) == pytest.approx(step.total / 1e9)
    # An fp8 KV cache (KVCacheConfig.cache_dtype): K/V at 1 byte, the rest at the weights'.
    fp8 = roofline.decode_step_bytes(
        TINY, 2, seq_lens=[10, 5], adapter_ranks=[(8,) * 7] * 3, kv_itemsize=1
    )
    assert fp8.kv_read == kv // 2 and fp8.total == step.total - kv // 2


def test_the_offline_pools_hold_the_largest_batch_of_adapters_and_no_more():
    """Batch 128 at rank 16 (pages of 16 rows): each pool the pages of 128 adapters on all seven
    modules (7:2:2:3), not 7 x 128 pages in every pool: gemma-2-9b's pools at batch 128 went
    from 29 GB (out of memory on the H100) to 14 GB."""
    pool = OfflineConfig().engine_config().lora_pool
    assert pool.axis_pages == (("embed", 896), ("heads", 256), ("kv_heads", 256), ("mlp", 384))
    assert pool.max_slots == 128 and pool.max_rank == 16


def test_offline_max_model_len_widens_the_tables_not_the_cache():
    """OfflineConfig.max_model_len (--max_model_len): the engines' context (page tables a
    server's width) while the KV pages stay what the requests fill; shorter than a request
    names the field."""
    config = OfflineConfig(batch_sizes=(32,), max_model_len=4096).engine_config()
    default = OfflineConfig(batch_sizes=(32,)).engine_config()
    assert config.kv.max_model_len == 4096 and default.kv.max_model_len == 384
    assert config.kv.num_pages == default.kv.num_pages == 32 * 24
    with pytest.raises(
        ConfigError,
        match=r"'max_model_len': expected None or an int >= prompt_len \+ output_len \(384\)",
    ):
        OfflineConfig(max_model_len=256)


def test_an_fp8_kv_cache_reaches_the_benchmark_engines_and_roofline():
    """--kv_cache_dtype (OfflineConfig / OnlineConfig.kv_cache_dtype): the engines' KV cache
    config, and the decode summary's K/V bytes at the cache's itemsize (weights and adapters
    at theirs)."""
    from jaxlora.bench.offline import summarize_decode
    from jaxlora.bench.timing import StepRecord

    assert OfflineConfig().engine_config().kv.cache_dtype == "auto"
    offline = OfflineConfig(batch_sizes=(2,), kv_cache_dtype="fp8")
    assert offline.engine_config().kv.cache_dtype == "fp8"
    assert OnlineConfig(kv_cache_dtype="fp8_e5m2").engine_config().kv.cache_dtype == "fp8_e5m2"
    with pytest.raises(ConfigError, match="cache_dtype"):
        OfflineConfig(kv_cache_dtype="int8").engine_config()
    records = [StepRecord("decode", 2, (10, 5 + i), ((8,) * 7,), True, 1e-3) for i in range(3)]
    auto = summarize_decode(records, 2, TINY, 2, 50.0)
    fp8 = summarize_decode(records, 2, TINY, 2, 50.0, kv_itemsize=1)
    assert fp8["bytes_kv_MB"] == pytest.approx(auto["bytes_kv_MB"] / 2)
    assert fp8["bytes_weights_MB"] == auto["bytes_weights_MB"]
    assert fp8["bytes_adapters_MB"] == auto["bytes_adapters_MB"]
    assert fp8["roofline_ms"] < auto["roofline_ms"]


def test_aliased_adapters_share_host_memory_and_serve_their_weight_set():
    pool = LoraPoolConfig(max_rank=8, rows_per_page=8, pages_per_pool=64, max_slots=4)
    store = make_store(TINY, pool, "float32")
    population = AdapterPopulation(
        store, rank=8, weight_sets=2, name_of=adapter_name, seed=5, std=0.4
    )
    names = population.ensure(range(6))
    assert names == [adapter_name(i) for i in range(6)] and len(store) == 6
    assert population.ensure([3]) == [adapter_name(3)] and len(store) == 6
    assert population.host_bytes == 2 * store.get(names[0]).nbytes
    assert store.cached_weights(store.get(names[4])) is population.weight_sets[0]

    params = init_params(TINY, 0)
    config = EngineConfig(
        kv=KVCacheConfig(page_size=4, num_pages=64, max_model_len=32),
        runner=RunnerConfig(
            max_batch=4,
            prefill_chunk=8,
            max_prefill_rows=2,
            decode_buckets=(4,),
            prefill_buckets=(2,),
        ),
        lora_pool=pool,
        warmup=False,
    )
    engine = Engine(
        TINY,
        params,
        config,
        dtype=jnp.float32,
        adapters=AdapterManager(store, AdapterManagerConfig(load_workers=0)),
    )
    prompt = [5, 9, 33, 2, 71, 8]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    requests = [engine.submit(prompt, greedy, adapter=n) for n in (names[1], names[4], None)]
    engine.run_until_idle()
    aliased = [r.output_ids for r in requests]
    # The same weights registered the ordinary way, one adapter per weight set.
    real = {
        f"set{k}": random_lora_weights(
            TINY, f"set{k}", 8, MODULES, seed=5 + k, std=0.4, dtype=np.float32
        )
        for k in range(2)
    }
    llm = jaxlora.LLM(TINY, params=params, adapters=real, load_workers=0, engine_config=config)
    expected = [
        c.token_ids
        for c in llm.generate([prompt] * 3, adapter=["set1", "set0", None], sampling=greedy)
    ]
    assert aliased == expected
    assert len({tuple(t) for t in expected}) == 3  # the adapters change the output


@pytest.fixture(scope="module")
def offline_result():
    config = OfflineConfig(
        batch_sizes=(1, 4), prompt_len=8, output_len=5, rank=8, skewed_adapters=30, prefill_rows=2
    )
    bench = build_engine(TINY, config.engine_config(), SETUP)
    return config, bench, run_offline(bench, config, copy_gbps=50.0)


def test_offline_rows_time_every_decode_step_against_its_roofline(offline_result):
    config, bench, result = offline_result
    rows = {(r["batch"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {(b, w) for b in (1, 4) for w in config.workloads}
    assert bench.kv_itemsize == bench.itemsize == 4  # "auto": the float32 model's
    assert result["not_run"] == []
    # "auto" on the CPU's reference impl: XLA's GEMMs, recorded beside the rows.
    assert config.projection_kernel == "auto" and result["projection_kernel_used"] == "xla"
    # The whole RunnerConfig beside them, defaults and nested configs included.
    runner = result["runner"]
    assert runner == json.loads(json.dumps(dataclasses.asdict(bench.engine.runner.runner)))
    assert runner["residual_norm"] == "pallas" and runner["residual_norm_warps"] == 16
    assert runner["max_batch"] == bench.engine.runner.runner.max_batch
    one_adapter = roofline.adapter_bytes(TINY, 4, (8,) * 7)
    for (batch, workload), r in rows.items():
        assert r["output_tokens"] == batch * config.output_len
        assert r["compilations_while_timed"] == 0
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        # The headline tokens/s is the untimed async pass's; the sync and the timed ones beside.
        free = r["free_running"]
        assert list(free) == ["async", "sync"]
        assert r["wall_s"] == free["async"]["wall_s"]
        assert all(
            f["compilations_while_timed"] == 0 and f["iteration_ms_median"] > 0
            for f in free.values()
        )
        # The host's time by phase is a part of each pass's wall time.
        for f in free.values():
            host = f["host_ms_per_iteration"]
            assert set(host) == {"schedule", "build", "dispatch", "wait", "append"}
            assert all(v >= 0 for v in host.values())
            assert 0 < sum(host.values()) * f["engine_iterations"] <= f["wall_s"] * 1e3
            # (and the engine thread's CPU in each phase, never above the phase's wall time)
            cpu = f["host_cpu_ms_per_iteration"]
            assert set(cpu) == set(host) and sum(cpu.values()) > 0
            assert all(0 <= cpu[phase] <= host[phase] * 1.05 + 0.05 for phase in host)
            # Decode-only iterations (every one after the prompts): the same phases, each
            # no longer than the whole iteration.
            decode = f["host_ms_decode_median"]
            assert set(decode) == set(host) and 0 < sum(decode.values())
        # Each pass records its longest iteration, the host's time between iterations and the
        # garbage collections it paid for (a stall is told from a slow step).
        for f in (r, *free.values()):
            assert f["iteration_ms_max"] >= f["iteration_ms_median"] > 0
            assert f["outside_iterations_ms"] >= 0
            assert set(f["gc"]["collections"]) == {"0", "1", "2"}
            assert f["gc"]["ms_total"] >= f["gc"]["ms_max"] >= f["gc"]["full_ms_max"] >= 0
        # Greedy tokens: the same in the timed, async and sync passes; a digest to compare runs.
        assert all(f["same_tokens_as_timed"] for f in free.values())
        assert len(r["output_digest"]) == 16 and len(r["output_head"]) == min(batch, 4)
        assert all(len(ids) == config.output_len for ids in r["output_head"])
        assert r["output_tokens_per_s_timed"] > 0
        # output_len - 1 decode steps per request; batch 4 prefills in two steps of 2, so two
        # decode steps run half the batch.
        assert r["full_batch_decode_steps"] == config.output_len - 1 - (batch > 2)
        assert r["decode_steps"] == config.output_len - (batch == 1)
        assert r["decode_step_ms"] > 0 and r["roofline_ms"] > 0
        assert r["roofline_ratio"] == pytest.approx(r["decode_step_ms"] / r["roofline_ms"])
        # Batch 1 prefills in one step, batch 4 in two of 2 rows; their median time beside (of
        # one or two steps: their mean).
        assert r["prefill_steps"] == 1 + (batch > 2)
        assert r["prefill_step_ms"] / 1e3 == pytest.approx(r["prefill_s"] / r["prefill_steps"])
        expected_adapters = {
            "no_lora": 0,
            "identical": 1,
            "uniform": round(batch**0.5),
            "distinct": batch,
        }.get(workload, r["distinct_adapters"])
        assert r["distinct_adapters"] == expected_adapters
        assert r["bytes_adapters_MB"] == pytest.approx(
            r["distinct_adapters_per_step"] * one_adapter / 1e6
        )
        if workload == "no_lora":
            assert "lora_cost_ratio" not in r
        else:
            base = rows[(batch, "no_lora")]
            assert r["lora_extra_ms"] == pytest.approx(r["decode_step_ms"] - base["decode_step_ms"])
            assert r["lora_explained_ms"] == pytest.approx(
                r["bytes_adapters_MB"] * 1e6 / 50e9 * 1e3
            )


def test_offline_rows_leave_the_heap_unfrozen(offline_result):
    """Each row runs with the objects before it frozen (config.freeze_heap, the default), and
    unfreezes them after: the benchmark's dropped engines stay collectable (CPython starts
    with some objects frozen; the unfreeze returns those too)."""
    import gc

    config, _, _ = offline_result
    assert config.freeze_heap and gc.get_freeze_count() == 0


def test_offline_digest_tells_outputs_apart(offline_result):
    from jaxlora.bench.offline import output_digest

    _, _, result = offline_result
    rows = {(r["batch"], r["workload"]): r for r in result["rows"]}
    # The same prompts: the adapters change the tokens, so the digests differ.
    assert rows[4, "no_lora"]["output_digest"] != rows[4, "distinct"]["output_digest"]
    assert rows[4, "no_lora"]["output_head"][0] == rows[1, "no_lora"]["output_head"][0]
    assert output_digest([[1, 2], [3]]) != output_digest([[3], [1, 2]])
    assert output_digest([[1, 2], [3]]) != output_digest([[1], [2, 3]])


def test_report_lists_offline_rows_by_batch_then_workload(offline_result):
    """Merged files keep their own row order; the report's table does not."""
    _, _, result = offline_result
    shuffled = {"offline": {**result, "rows": result["rows"][::-1]}}
    table = report.markdown(shuffled).split("### Offline throughput")[1]
    listed = re.findall(r"^\| (\d+) \| (\w+) \|", table, flags=re.M)
    assert listed == [(str(b), w) for b in (1, 4) for w in WORKLOADS]
    # Beside the timed step: the async pass's iteration and how long the host waited in it.
    header = table.strip().splitlines()[0].split(" | ")
    assert header[6:8] == ["async iteration ms", "host wait ms"]
    row = table.strip().splitlines()[2].split(" | ")
    assert row[6] != "nan" and row[7] != "nan"
    # And the median prefill step (what the prefill attention and kernels change).
    assert header[-1] == "prefill ms |" and row[-1] != "nan |"


def test_offline_time_budget_lists_rows_not_run(offline_result):
    config, bench, _ = offline_result
    result = run_offline(
        bench,
        dataclasses.replace(config, batch_sizes=(4,), workloads=("no_lora", "distinct")),
        copy_gbps=50.0,
        time_budget_s=0.0,
    )
    assert [r["workload"] for r in result["rows"]] == ["no_lora"]
    assert result["not_run"] == [{"batch": 4, "workload": "distinct"}]


def test_offline_profile_traces_iterations_outside_the_step_times(offline_result, monkeypatch):
    config, bench, _ = offline_result
    traced = []

    def fake_profile(step, steps):  # CPU traces have no GPU kernels: count the traced steps
        for _ in range(steps):
            step()
            traced.append(1)
        return profile.breakdown([("nvjet_gemm", 0, 2_000_000)], steps, 0.004 * steps)

    monkeypatch.setattr(profile, "profile_iterations", fake_profile)
    config = dataclasses.replace(
        config,
        batch_sizes=(4,),
        workloads=("distinct",),
        prompt_len=3,
        output_len=10,
        profile_steps=3,
    )
    row = run_offline(bench, config, copy_gbps=50.0)["rows"][0]
    # 3 iterations traced in the timed pass, 3 more in an extra async pass (steps not waited
    # for: the device's idle time as the engine serves).
    assert len(traced) == 6 and row["output_tokens"] == 4 * 10
    assert row["profile"]["category_ms"]["gemm"] == pytest.approx(2.0 / 3)
    assert row["profile_async"]["steps"] == 3
    assert len(row["profile"]["profiled_step_records_ms"]) == 3
    # 9 decode steps per request, two of them on half the batch; 3 traced ones are left out.
    assert row["full_batch_decode_steps"] == 10 - 1 - 1 - 3
    with pytest.raises(ConfigError, match="profile_steps"):
        OfflineConfig(profile_steps=-1)


def test_profile_breakdown_groups_kernels_and_measures_idle_time():
    events = [  # (name, start ns, duration ns) over 2 iterations of 10 ms wall
        ("nvjet_tst_128x64_gemm", 0, 3_000_000),
        ("sgmv_shrink_decode_rows16", 3_000_000, 500_000),
        ("sgmv_expand_prefill_bn128", 3_500_000, 500_000),
        ("paged_attention_decode_b16", 4_000_000, 1_000_000),
        ("loop_multiply_fusion", 4_500_000, 1_000_000),  # overlaps attention by 0.5 ms
        ("MemcpyH2D", 6_000_000, 200_000),
        ("input_reduce_fusion", 10_000_000, 800_000),
    ]
    b = profile.breakdown(events, steps=2, wall_s=0.020, top=3)
    assert b["category_ms"] == pytest.approx(
        {"lora": 0.5, "attention": 0.5, "gemm": 1.5, "copy": 0.1, "other": 0.9}
    )
    assert b["busy_ms"] == pytest.approx((5.5 + 0.2 + 0.8) / 2)
    assert b["wall_ms"] == pytest.approx(10.0) and b["idle_ms"] == pytest.approx(10.0 - 3.25)
    assert b["kernels_per_step"] == 3.5
    # Idle: 0.5 ms before the MemcpyH2D, 3.8 ms before the last kernel (both long).
    assert profile.idle_gaps_ns(events) == [500_000, 3_800_000]
    assert b["launch_gap_ms"] == 0.0 and b["long_gaps_per_step"] == 1.0
    assert b["long_gap_ms"] == pytest.approx((0.5 + 3.8) / 2)
    close = [("a", 0, 1000), ("b", 21_000, 1000), ("c", 200_000, 1000)]
    assert profile.breakdown(close, 1, 1e-3)["launch_gap_ms"] == pytest.approx(0.02)
    assert [k["name"] for k in b["top_kernels"]] == [
        "nvjet_tst_128x64_gemm",
        "paged_attention_decode_b16",
        "loop_multiply_fusion",
    ]
    assert b["top_kernels"][0] == {
        "name": "nvjet_tst_128x64_gemm",
        "category": "gemm",
        "ms": 1.5,
        "launches": 0.5,
    }
    assert "idle 6.75" in profile.format_breakdown("t", b)
    assert profile.gpu_events("/nonexistent") == []


def small_online_config(**fields) -> OnlineConfig:
    """An online trace the tiny model serves in seconds on the CPU (fields override)."""
    defaults = dict(
        rate=40.0,
        duration_s=1.0,
        drain_timeout_s=60.0,
        min_len=4,
        max_len=12,
        rank=8,
        max_batch=4,
        prefill_chunk=8,
        prefill_rows=1,
        resident_adapters=6,
        kv_pages=64,
    )
    return OnlineConfig(**{**defaults, **fields})


def test_online_trace_pages_adapters_and_measures_latency():
    config = small_online_config(adapter_counts=(3, 40), duration_s=1.5)
    bench = build_engine(TINY, config.engine_config(), SETUP)
    online = run_online(bench, config)
    assert online["projection_kernel_used"] == "xla"
    assert all("gpu" in row for row in online["rows"])  # (None without nvidia-smi)
    assert online["runner"]["max_batch"] == 4 and online["runner"]["residual_norm"] == "pallas"
    rows = online["rows"]
    # Untimed by default (the engine as it serves), timed on request; the counts either way.
    timed = run_online(bench, dataclasses.replace(config, adapter_counts=(3,), time_steps=True))[
        "rows"
    ][0]
    assert timed["decode_step_ms_median"] > 0 and bench.timer.blocking
    assert all(math.isnan(r["decode_step_ms_median"]) and not r["steps_timed"] for r in rows)
    assert all(r["decode_steps"] > 0 and r["decode_rows_mean"] > 0 for r in (*rows, timed))
    for r, count in zip(rows, (3, 40), strict=True):
        trace = synthetic_trace(config.trace(count))
        assert r["num_adapters"] == count and r["requests"] == len(trace)
        assert r["finished"] == r["requests"] and r["unfinished"] == 0
        assert r["compilations_while_timed"] == 0
        assert set(r["gc"]["collections"]) == {"0", "1", "2"} and r["gc"]["ms_total"] >= 0
        assert r["distinct_adapters"] == len({t.adapter for t in trace})
        # The pool starts empty: every adapter is copied in at least once.
        assert r["adapter_misses"] >= r["distinct_adapters"]
        assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
        assert 0 <= r["slo_attainment"] <= 1 and r["tpot_ms_median"] > 0
        assert r["throughput_rps"] == pytest.approx(r["finished"] / r["elapsed_s"])
        assert r["offered_rps"] == pytest.approx(len(trace) / trace[-1].arrival_s)
        assert 0 <= r["queued_step_share"] <= 1 and r["waiting_mean"] >= 0
        assert (r["waiting_mean"] > 0) == (r["queued_step_share"] > 0)
        assert set(r["host_ms_per_step"]) == {"schedule", "build", "dispatch", "wait", "append"}
        assert 0 < sum(r["host_ms_per_step"].values()) <= r["elapsed_s"] * 1e3
        assert set(r["host_cpu_ms_per_step"]) == set(r["host_ms_per_step"])
        assert 0 < sum(r["host_cpu_ms_per_step"].values()) <= sum(r["host_ms_per_step"].values())
        # Each step reads each distinct adapter it uses once: at least every adapter of the
        # trace once, at most one adapter per row of every step.
        one_adapter_gb = roofline.adapter_bytes(TINY, bench.itemsize, [config.rank] * 7) / 1e9
        assert r["adapter_GB_read"] >= r["distinct_adapters"] * one_adapter_gb * (1 - 1e-9)
        rows_read = r["decode_steps"] * config.max_batch + r["prefill_steps"] * 1
        assert r["adapter_GB_read"] <= rows_read * one_adapter_gb * (1 + 1e-9)
    # 40 adapters do not fit in 6 resident slots: some were evicted and copied again.
    assert rows[1]["adapter_evictions"] > 0
    assert rows[1]["adapter_misses"] > rows[1]["distinct_adapters"]
    with pytest.raises(ConfigError, match="resident_adapters"):
        OnlineConfig(max_batch=8, resident_adapters=4)


def test_online_trace_caps_the_adapters_of_a_step():
    config = small_online_config(adapter_counts=(40,), max_slots=2, max_skips=3)
    engine_config = config.engine_config()
    assert engine_config.lora_pool.max_slots == 2 and engine_config.max_skips == 3
    # Rank 8 in pages of 8 rows, 6 resident adapters on all seven modules: 7:2:2:3 pages each.
    pages = [
        engine_config.lora_pool.pages_in(axis) for axis in ("embed", "heads", "kv_heads", "mlp")
    ]
    assert pages == [42, 12, 12, 18]
    bench = build_engine(TINY, engine_config, SETUP)
    (row,) = run_online(bench, config)["rows"]
    assert row["finished"] == row["requests"] > 8
    assert row["adapters_per_step_max"] == 2 < row["distinct_adapters"]
    assert row["adapters_per_decode_step_mean"] <= 2
    assert OnlineConfig().engine_config().lora_pool.max_slots == OnlineConfig().max_batch
    for bad in (0, 65, 2.0):
        with pytest.raises(ConfigError, match="max_slots"):
            OnlineConfig(max_batch=64, max_slots=bad)


def test_online_trace_with_system_prompts_computes_them_once_with_prefix_caching():
    config = small_online_config(
        adapter_counts=(2,),
        rate=30.0,
        prefix_len=40,
        prefix_caching=(False, True),
        prefill_chunk=16,
        prefill_rows=2,
        kv_pages=96,
    )
    engine_config = config.engine_config()
    assert engine_config.kv.max_model_len == 40 + 2 * 12
    bench = build_engine(TINY, engine_config, SETUP)
    off, on = run_online(bench, config, copy_gbps=20.0, matmul_tflops=0.5)["rows"]
    trace = synthetic_trace(config.trace(2))
    total = sum(40 + t.prompt_len for t in trace)
    for row, caching in ((off, False), (on, True)):
        assert row["prefix_caching"] is caching and row["prefix_len"] == 40
        assert row["finished"] == row["requests"] == len(trace) > 10
        assert row["prompt_tokens"] == total
        assert row["decode_floor_s"] > 0 and row["prefill_floor_s"] > 0
    # (A prompt whose last chunk is one token is fed in a decode step: not counted.)
    computed_at_least = total - len(trace)
    assert off["prompt_tokens_cached"] == 0
    assert computed_at_least <= off["prompt_tokens_computed"] <= total
    # With the cache each adapter's system prompt is computed about once: its two full
    # 16-token pages (32 of its 40 tokens) are taken from the cache by the later requests.
    assert on["prompt_tokens_cached"] > 0 and on["prompt_tokens_cached"] % 16 == 0
    assert on["prompt_tokens_cached"] <= 32 * (len(trace) - 1)
    assert on["prompt_tokens_computed"] + on["prompt_tokens_cached"] >= computed_at_least
    assert on["prompt_tokens_computed"] < off["prompt_tokens_computed"]
    assert on["cached_share"] == pytest.approx(on["prompt_tokens_cached"] / total)
    assert on["prefill_floor_s"] < off["prefill_floor_s"]
    # The last trace left its pages cached; turning caching off forgets them.
    assert bench.engine.kv.prefix_caching and bench.engine.kv.cached_pages > 0
    assert bench.engine.set_prefix_caching(False) > 0 and bench.engine.kv.cached_pages == 0
    text = report.markdown({"meta": {}, "online": {"rows": [off, on]}})
    assert "### Shared system prompts (prefix caching)" in text
    assert "Prefix caching on against off" in text
    # The trace with system prompts is not S-LoRA's: its rows judge no target.
    assert "### Online (S-LoRA synthetic trace)" not in text
    # Nor is one with caching on and no system prompt, listed with the prefix rows (it was
    # in neither table).
    bare = {**on, "prefix_len": 0}
    rows = report.prefix_rows([off, bare])
    assert rows == [off, bare] and report.slora_rows([off, bare]) == []
    with pytest.raises(ConfigError, match="'prefix_caching'"):
        OnlineConfig(prefix_caching=(True, True))
    with pytest.raises(ConfigError, match="set_prefix_caching"):
        bench.engine.set_prefix_caching("on")


def test_serving_client_summary_counts_chunks_tokens_and_errors():
    from jaxlora.bench.serving_client import summarize

    def result(index, arrival, chunks, tokens, max_tokens=3, error=None):
        return {
            "index": index,
            "arrival_s": arrival,
            "sent_s": arrival,
            "end_s": (chunks[-1] if chunks else arrival) + 0.01,
            "chunk_times": chunks,
            "max_tokens": max_tokens,
            "prompt_tokens": 5,
            "completion_tokens": tokens,
            "error": error,
        }

    results = [
        result(0, 0.0, [0.1, 0.2, 0.3], 3),
        result(1, 0.5, [0.9, 1.1], 3),  # two chunks for three tokens
        result(2, 0.6, [0.7], 1, max_tokens=4),  # cut short: not finished
        result(3, 0.7, [], None, error="HTTP 400: bad"),
    ]
    s = summarize(results, slo_s=0.3)
    assert (s["requests"], s["finished"], s["unfinished"], s["errors"]) == (4, 2, 2, 1)
    assert s["first_errors"] == ["HTTP 400: bad"]
    assert s["elapsed_s"] == pytest.approx(1.11)
    assert s["throughput_rps"] == pytest.approx(2 / 1.11)
    assert s["output_tokens_per_s"] == pytest.approx(6 / 1.11)
    assert s["ttft_p50_s"] == pytest.approx(0.25)  # 0.1 and 0.4 after their arrivals
    assert s["tpot_ms_median"] == pytest.approx(100.0)  # 0.2 / 2 tokens both
    assert s["itl_ms_p50"] == pytest.approx(100.0)  # gaps 0.1, 0.1, 0.2
    assert s["tokens_per_chunk"] == pytest.approx(6 / 5)
    assert s["slo_attainment"] == pytest.approx(1 / 4)  # of every request sent


def test_serving_over_http_against_the_engine_in_process(monkeypatch):
    from jaxlora.bench.serving import ServerVariant, bench_tokenizer, run_serving
    from jaxlora.llm import LLM

    switches = []
    set_switch_interval = sys.setswitchinterval

    def record_switch_interval(seconds):
        switches.append(seconds)
        set_switch_interval(seconds)

    monkeypatch.setattr(sys, "setswitchinterval", record_switch_interval)
    interpreter_interval = sys.getswitchinterval()

    config = small_online_config(
        adapter_counts=(3,), rate=20.0, prefill_chunk=16, prefill_rows=2, kv_pages=96
    )
    bench = build_engine(
        TINY, config.engine_config(), SETUP, tokenizer=bench_tokenizer(TINY.vocab_size)
    )
    variant = ServerVariant(stream_interval=2, switch_interval_ms=0.5)
    (row,) = run_serving(bench, config, copy_gbps=20.0, matmul_tflops=0.5, variants=(variant,))[
        "rows"
    ]
    engine, (http,) = row["in_process"], row["http"]
    # The pass ran at the variant's switch interval and gave the interpreter's back after it.
    assert switches == [0.0005, interpreter_interval]
    assert sys.getswitchinterval() == interpreter_interval
    assert (http["stream_interval"], http["switch_interval_ms"]) == (2, 0.5)
    trace = synthetic_trace(config.trace(3))
    assert row["num_adapters"] == 3
    for r in (engine, http):
        assert r["requests"] == r["finished"] == len(trace) > 5
        assert r["ttft_p50_s"] > 0 and r["tpot_ms_median"] > 0
        assert r["decode_floor_s"] > 0 and r["prefill_floor_s"] > 0
        # The engine's host phases, wall and its thread's CPU (never more than the wall)
        wall, cpu = r["host_ms_per_step"], r["host_cpu_ms_per_step"]
        assert set(wall) == set(cpu) == {"schedule", "build", "dispatch", "wait", "append"}
        assert all(0 <= cpu[phase] <= wall[phase] * 1.05 + 0.05 for phase in wall)
        assert sum(cpu.values()) > 0
    assert http["errors"] == 0 and http["compilations_while_timed"] == 0
    assert http["output_tokens_per_s"] * http["elapsed_s"] == pytest.approx(
        sum(t.output_len for t in trace)
    )
    assert 1 <= http["tokens_per_chunk"] and http["itl_ms_p50"] > 0
    # The same prompts: computed whole in both passes (no prefix caching in either).
    assert http["prompt_tokens_computed"] == engine["prompt_tokens_computed"]
    assert http["prefill_floor_s"] == pytest.approx(engine["prefill_floor_s"])
    text = report.markdown({"meta": {}, "serving": {"rows": [row]}})
    assert "### Serving over HTTP" in text
    assert "| HTTP (stream interval 2, switch interval 0.5 ms) / in-process |" in text
    assert not bench.engine._thread  # (the engine's thread stopped with the server)
    # The engine and its adapter manager serve on after the server (the next trace's passes).
    again = run_trace(bench, config, 3)
    assert again["finished"] == again["requests"] == len(trace)
    with pytest.raises(ConfigError, match="from_engine: expected an Engine"):
        LLM.from_engine(bench.manager)


def _results(ratio=1.1, lora_ratio=1.05, speedup=40.0, retention=0.97):
    rows = [
        {
            "batch": 32,
            "workload": "no_lora",
            "roofline_ratio": ratio,
            "output_tokens_per_s": 1000.0,
        },
        {
            "batch": 8,
            "workload": "distinct",
            "roofline_ratio": 3.0,
            "output_tokens_per_s": 10.0 * speedup,
            "lora_cost_ratio": lora_ratio,
            "lora_extra_ms": 1.0,
            "lora_explained_ms": 1.0 / lora_ratio,
        },
    ]
    return {
        "offline": {"rows": rows},
        "peft": {"rows": [{"batch": 8, "workload": "distinct", "output_tokens_per_s": 10.0}]},
        "online": {
            "rows": [
                {
                    "num_adapters": n,
                    "throughput_rps": rps,
                    "ttft_p50_s": 0.1,
                    "ttft_p90_s": 0.2,
                    "ttft_p99_s": 0.5,
                    "output_tokens_per_s": 250 * rps,
                }
                for n, rps in ((5, 10.0), (2000, 10.0 * retention))
            ]
        },
    }


# The online table's other fields.
FULL_ONLINE_ROW = dict(
    requests=3,
    finished=3,
    tpot_ms_median=10.0,
    slo_attainment=1.0,
    adapter_misses=1,
    adapter_GB_copied=0.1,
    adapters_per_decode_step_mean=1.0,
)


def test_report_judges_each_target():
    met = [v["met"] for v in report.verdicts(_results())]
    assert met == [True, True, True, True]  # batch 8's 3.0x is below the roofline target's 32
    missed = report.verdicts(_results(ratio=1.3, lora_ratio=1.2, speedup=20, retention=0.9))
    assert [v["met"] for v in missed] == [False, False, False, False]
    assert "1.30x" in missed[0]["detail"] and "20.0x" in missed[2]["detail"]
    assert missed[3]["detail"] == "90.0% (9.00 vs 10.00 req/s); output tokens/s 90.0%"
    assert [v["met"] for v in report.verdicts({})] == [None] * 4
    # Online traces are judged at capacity: one that left no request waiting after most steps
    # is not a measurement of the target, whatever its ratio.
    for share, met in ((0.9, True), (0.2, None)):
        results = _results()
        for r in results["online"]["rows"]:
            r.update(queued_step_share=share, offered_rps=12.5)
        online = report.verdicts(results)[3]
        assert online["met"] is met
        assert ("below capacity" in online["detail"]) == (met is None)
    assert online["detail"].endswith(
        "requests waited after 20% / 20% of the steps (5 / 2000 adapters), the served rates "
        "follow the offered 12.50 req/s: raise --online_rate"
    )
    online_rows = {
        "online": {"rows": [{**r, **FULL_ONLINE_ROW} for r in results["online"]["rows"]]}
    }
    assert "| 5 | 3 | 3 | 12.5 | 10.0 | 2500.0 | 20% |" in report.markdown(online_rows)
    # The bound the extra adapter bytes set, at the copy rate of the online run: 20 s and 400 GB
    # more at 4,000 GB/s, at most 20 / 20.1 of the throughput.
    results = _results(retention=0.9)
    for r, gb in zip(results["online"]["rows"], (4.0, 404.0), strict=True):
        r.update(adapter_GB_read=gb, elapsed_s=20.0)
    results["meta"] = {"online": {"copy_GBps": 4000.0}}
    assert report.adapter_bytes_retention_bound(*results["online"]["rows"], 4000.0) == (
        pytest.approx(20 / 20.1)
    )
    assert report.verdicts(results)[3]["detail"] == (
        "90.0% (9.00 vs 10.00 req/s); output tokens/s 90.0%; at most 99.5% if the extra adapter "
        "bytes cost their copy time"
    )
    results["meta"] = {"copy_GBps": 4000.0}  # one run's file, as scripts/benchmark.py reports it
    assert "at most 99.5% if" in report.verdicts(results)[3]["detail"]
    del results["meta"]
    assert "at most" not in report.verdicts(results)[3]["detail"]  # no copy rate, no bound
    # The async-scheduled iteration, where measured, is shown beside the timed step.
    results = _results(ratio=1.3)
    results["offline"]["rows"][0].update(
        roofline_ms=4.0, free_running={"async": {"iteration_ms_median": 5.2}}
    )
    detail = report.verdicts(results)[0]["detail"]
    assert detail.endswith(
        "async-scheduled iteration (device step) 1.30-1.30x the roofline, 0/1 within 1.25x"
    )
    results["offline"]["rows"][0]["free_running"]["async"]["iteration_ms_median"] = 4.9
    detail = report.verdicts(results)[0]["detail"]
    assert detail.endswith("1.23-1.23x the roofline, 1/1 within 1.25x")


def test_report_merges_rows_of_one_setup_from_several_files(tmp_path):
    """Rows of one set-up measured in separate runs (batch 8/32, then 128) make one report;
    a later file's row replaces an earlier one with the same key; different set-ups are
    refused with a message naming both files and the field."""
    meta = {"device": "H200", "model": {"name": "llama-2-7b", "num_layers": 32}, "rank": 16}
    config = {"batch_sizes": [8, 32], "prompt_len": 256, "free_running": ["async", "sync"]}

    def write(name, rows, meta=meta, config=config):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": meta, "offline": {"config": config, "rows": rows}}))
        return str(path)

    def row(batch, workload, tokens_per_s):
        return {"batch": batch, "workload": workload, "output_tokens_per_s": tokens_per_s}

    first = write("a.json", [row(8, "no_lora", 1.0), row(32, "no_lora", 2.0)])
    second = write(
        "b.json",
        [row(128, "no_lora", 3.0), row(32, "no_lora", 4.0)],
        config={**config, "batch_sizes": [128, 32], "free_running": ["async"]},
    )
    merged = report.load([first, second])
    rows = merged["offline"]["rows"]
    assert [(r["batch"], r["output_tokens_per_s"]) for r in rows] == [
        (8, 1.0),
        (32, 4.0),
        (128, 3.0),
    ]
    assert merged["offline"]["config"]["batch_sizes"] == [8, 32, 128]
    assert merged["meta"]["offline"]["sources"] == [first, second]
    other_model = {**meta, "model": {"name": "llama-2-7b", "num_layers": 8}}
    with pytest.raises(ConfigError, match=r"c\.json: .*'model\.num_layers' = 8, .*a\.json with 32"):
        report.load([first, write("c.json", [row(8, "no_lora", 5.0)], meta=other_model)])
    with pytest.raises(ConfigError, match=r"d\.json: .*config field 'prompt_len' is 512"):
        report.load(
            [first, write("d.json", [row(8, "no_lora", 5.0)], config={**config, "prompt_len": 512})]
        )
    # The script prints our error, not a traceback.
    out = _run_script("benchmark.py", "--section=report", f"--inputs={first},{tmp_path / 'c.json'}")
    assert out.returncode != 0 and out.stderr.strip().startswith("error: ")
    assert "Traceback" not in out.stderr


def test_benchmark_script_writes_results_and_report(tmp_path):
    offline = tmp_path / "offline.json"
    _run_script(
        "benchmark.py",
        "--section=offline",
        "--model=tiny",
        "--dtype=float32",
        "--copy_bandwidth_gbps=20",
        "--rank=4",
        "--batch_sizes=2",
        "--offline_workloads=no_lora,distinct",
        "--prompt_len=6",
        "--output_len=3",
        "--prefill_rows=2",
        "--weight_sets=1",
        "--compile_threads=2",
        "--kv_cache_dtype=fp8",
        "--max_model_len=64",
        "--prefill_context_buckets=16",
        f"--json_out={offline}",
        check=True,
        timeout=600,
    )
    doc = json.loads(offline.read_text())
    assert doc["meta"]["copy_GBps"] == 20 and doc["meta"]["platform"] == "cpu"
    assert doc["offline"]["config"]["kv_cache_dtype"] == "fp8"
    # A 64-key table (4 pages), prefill steps at 1 page (the 16-key bucket) and at the whole.
    assert doc["offline"]["config"]["max_model_len"] == 64
    shapes = doc["meta"]["setup_seconds"]["compile"]["shapes"]
    assert {(mode, pages) for mode, _, pages, *_ in shapes} == {
        ("decode", 4),
        ("prefill", 1),
        ("prefill", 4),
    }
    assert [r["workload"] for r in doc["offline"]["rows"]] == ["no_lora", "distinct"]
    peft = tmp_path / "peft.json"
    peft.write_text(
        json.dumps(
            {
                "meta": {"device": "test"},
                "peft": {
                    "rows": [
                        {
                            "batch": 2,
                            "workload": "distinct",
                            "distinct_adapters": 2,
                            "output_tokens": 6,
                            "wall_s": 1.0,
                            "output_tokens_per_s": 6.0,
                        }
                    ]
                },
            }
        )
    )
    markdown = tmp_path / "tables.md"
    out = _run_script(
        "benchmark.py",
        "--section=report",
        f"--inputs={offline},{peft}",
        f"--markdown_out={markdown}",
        check=True,
    ).stdout
    assert "### Offline throughput" in out and "HF transformers + PEFT" in out
    assert markdown.read_text().strip() == out.strip()
    with pytest.raises(ConfigError, match="not found"):
        report.load([str(tmp_path / "missing.json")])


def test_benchmark_script_names_a_bad_online_flag():
    for flag, message in (
        ("--online_prefix_caching=off,maybe", "--online_prefix_caching: expected off and / or on"),
        ("--online_prefix_len=-3", "field 'prefix_len': expected an int >= 0, got -3"),
        (
            "--serving_stream_interval=1,0",
            "--serving_stream_interval: expected positive integers, got '0'",
        ),
        ("--serving_switch_interval_ms=fast", "--serving_switch_interval_ms: expected ms in"),
    ):
        out = _run_script("benchmark.py", "--section=online", "--model=tiny", flag)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert out.stderr.strip().startswith("error: ") and message in out.stderr


def test_server_variants_pair_every_stream_interval_with_every_switch_interval():
    from jaxlora.bench.serving import ServerVariant, server_variants

    assert server_variants(["1", "4"], ["0", "0.5"]) == (
        ServerVariant(1, 0.0),
        ServerVariant(1, 0.5),
        ServerVariant(4, 0.0),
        ServerVariant(4, 0.5),
    )
    assert ServerVariant(1, 0.0).switch_interval_s is None  # (the interpreter's own)
    assert ServerVariant(4, 0.5).switch_interval_s == 0.0005
    assert ServerVariant(4, 0.5).label == "stream interval 4, switch interval 0.5 ms"
    for streams, switches, message in (
        ([], ["0"], "--serving_stream_interval: expected at least one"),
        (["2.5"], ["0"], "--serving_stream_interval: expected positive integers, got '2.5'"),
        (["1"], ["-1"], "--serving_switch_interval_ms: expected ms in [0, 1000]"),
        (["1"], ["inf"], "--serving_switch_interval_ms"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            server_variants(streams, switches)


def test_serving_report_reads_a_single_http_pass_and_every_variant():
    """The fifty-seventh session's files hold one HTTP pass a row (a dict); later ones a list,
    one a server variant, each with the engine's host time beside its CPU."""

    def serving_row(rps, **extra):
        return {
            "requests": 10,
            "finished": 10,
            "throughput_rps": rps,
            "output_tokens_per_s": 100 * rps,
            "ttft_p50_s": 0.5 / rps,
            "ttft_p90_s": 1.0 / rps,
            "ttft_p99_s": 2.0 / rps,
            "tpot_ms_median": 10.0,
            "slo_attainment": 1.0,
            **extra,
        }

    engine = serving_row(10.0, host_ms_per_step={"build": 1.0, "dispatch": 2.0, "wait": 5.0})
    old = {"num_adapters": 5, "in_process": engine, "http": serving_row(8.0)}
    text = report.markdown({"meta": {}, "serving": {"rows": [old]}})
    assert "| 5 | HTTP / in-process |  | 0.800x |" in text
    assert "| 3.00 |" in text  # the engine's own host ms, "wait" left out (no CPU recorded)
    host = {"build": 1.0, "dispatch": 6.0, "wait": 1.0}
    cpu = {"build": 0.9, "dispatch": 1.5, "wait": 0.1}
    new = {
        **old,
        "http": [
            serving_row(8.0, stream_interval=1, switch_interval_ms=0.0),
            serving_row(
                9.5,
                stream_interval=1,
                switch_interval_ms=0.5,
                host_ms_per_step=host,
                host_cpu_ms_per_step=cpu,
                server_cpu_us_per_token=61.25,
            ),
        ],
    }
    text = report.markdown({"meta": {}, "serving": {"rows": [new]}})
    assert "| 5 | HTTP / in-process |  | 0.800x |" in text
    assert "| 5 | HTTP (switch interval 0.5 ms) / in-process |  | 0.950x |" in text
    assert "| 7.00 (2.40) | 61.2 |" in text
    # The HTTP passes alone (--noserving_in_process): no baseline row, no ratios.
    text = report.markdown({"meta": {}, "serving": {"rows": [{**new, "in_process": None}]}})
    assert "| 5 | HTTP (switch interval 0.5 ms) | 10 / 10 |" in text
    assert "in-process |" not in text


def test_serving_without_the_in_process_pass_runs_only_the_http_ones(monkeypatch):
    from jaxlora.bench import serving

    def not_run(*args, **kwargs):
        raise AssertionError("the in-process pass ran")

    passes = []
    monkeypatch.setattr(serving, "run_trace", not_run)
    monkeypatch.setattr(
        serving, "serve_http", lambda bench, config, count, **kw: passes.append(kw) or {"n": count}
    )
    config = small_online_config(adapter_counts=(3, 4))
    variants = (serving.ServerVariant(1, 0.0), serving.ServerVariant(1, 0.5))
    rows = serving.run_serving(None, config, variants=variants, in_process=False)["rows"]
    assert [(r["num_adapters"], r["in_process"], [h["n"] for h in r["http"]]) for r in rows] == [
        (3, None, [3, 3]),
        (4, None, [4, 4]),
    ]
    assert [p["variant"] for p in passes] == [*variants, *variants]


def test_report_figure(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert report.plot(_results(), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_peft_baseline_on_the_tiny_model():
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)
    from jaxlora.bench.peft_baseline import PeftConfig, run_peft

    config = PeftConfig(batch_sizes=(1, 3), prompt_len=8, output_len=4, rank=4)
    rows = run_peft(TINY, config, device="cpu", dtype="float32")["rows"]
    assert [(r["batch"], r["workload"]) for r in rows] == [
        (1, "identical"),
        (1, "distinct"),
        (3, "identical"),
        (3, "distinct"),
    ]
    for r in rows:
        assert r["tokens_per_request"] == 4 and r["output_tokens"] == 4 * r["batch"]
        assert r["distinct_adapters"] == (r["batch"] if r["workload"] == "distinct" else 1)


def test_projection_bench_config_names_and_variants():
    """scripts/bench_projection.py's --configs / --variants / --lora_configs name MatmulConfigs."""
    from jaxlora.bench.projection import adapters_for, best_configs, config_grid
    from pallas_kernels.lora_matmul import MatmulConfig

    variants = {"rows": {"epilogue": "rows"}, "n16k256": {"block_n": 16, "epilogue_block_k": 256}}
    grid = config_grid("default,bm64bn32bk128w4s4,rows,n16k256", variants)
    assert grid == {
        "default": MatmulConfig(),
        "bm64bn32bk128w4s4": MatmulConfig(block_m=64, block_n=32, block_k=128, num_warps=4),
        "rows": MatmulConfig(epilogue="rows"),
        "n16k256": MatmulConfig(block_n=16, epilogue_block_k=256),
    }
    assert config_grid("") == {}
    with pytest.raises(ValueError, match="expected"):
        config_grid("n16")  # not a block name and not a variant
    with pytest.raises(
        ConfigError, match=r"--variants\['bad'\]: unknown MatmulConfig field 'epilog'"
    ):
        config_grid("bad", {"bad": {"epilog": "dot"}})
    with pytest.raises(ConfigError, match=r"--variants\['bad'\]: .*'epilogue'"):
        config_grid("bad", {"bad": {"epilogue": "fused"}})
    # The script refuses them before touching a GPU, with our message and no traceback.
    out = _run_script(
        "bench_projection.py", "--configs=bad", '--variants={"bad": {"epilog": "dot"}}'
    )
    assert out.returncode != 0 and "unknown MatmulConfig field 'epilog'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run_script("bench_projection.py", "--lora_workloads=identical,skewed")
    assert out.returncode != 0 and "unknown workload 'skewed'" in out.stderr
    assert "Traceback" not in out.stderr
    assert [adapters_for(w, 128) for w in ("identical", "uniform", "distinct")] == [1, 11, 128]
    rows = [
        {"group": "o", "tokens": 8, "us": {"xla": 1.0, "default": 3.0, "rows": 2.0}},
        {"group": "o", "tokens": 32, "us": {"xla": 1.0, "default": 2.0, "rows": 4.0}},
    ]
    assert best_configs(rows, grid) == {("o", 8): "rows", ("o", 32): "default"}


def test_projection_bench_pool_rank_sizes_the_tables_like_the_engine():
    """--pool_rank gives the slot tables the engine pool's pages per weight (rank capacity 64:
    4 pages for rank-16 adapters, the last 3 never read): the same delta as tables sized to the
    rank, with the kernels' v widened to the capacity."""
    from jaxlora.bench.projection import lora_case
    from pallas_kernels.sgmv import sgmv_delta_reference, sgmv_shrink_reference

    common = dict(
        layers=2,
        in_width=32,
        widths=(32, 16, 16),
        weights=(0, 1, 2),
        rank=16,
        num_adapters=3,
        num_tokens=5,
        dtype=jnp.float32,
    )
    tight = lora_case(jax.random.PRNGKey(0), **common)
    wide = lora_case(jax.random.PRNGKey(0), pool_rank=64, **common)
    assert tight.a_pages.shape == (3, 7, 1) and wide.a_pages.shape == (3, 7, 4)
    assert wide.adapter_bytes == tight.adapter_bytes
    np.testing.assert_array_equal(wide.b_pages[:, :, :1], tight.b_pages)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 32))

    def delta(case):
        return sgmv_delta_reference(
            x,
            case.a_pool,
            case.b_pools,
            case.a_pages,
            case.b_pages,
            case.ranks,
            case.scales,
            case.token_slot,
            1,
            weights=case.weights,
        )

    np.testing.assert_allclose(delta(wide), delta(tight), rtol=1e-6, atol=1e-6)
    v = sgmv_shrink_reference(
        x, wide.a_pool, wide.a_pages, wide.ranks, wide.token_slot, 1, weights=wide.weights
    )
    assert v.shape == (5, 3, 64)


def test_projection_chain_scan_matches_unrolled():
    """bench_projection's chains: the scan loop (traced layer) computes what the unrolled one
    does; an unknown loop is our error."""
    from jaxlora.bench.projection import chain

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 64)) * 0.1
    unrolled = chain("xla", None, layers=3, passes=2)(x, w, None)
    scan = chain("xla", None, layers=3, passes=2, layer_loop="scan")(x, w, None)
    np.testing.assert_allclose(np.asarray(scan), np.asarray(unrolled), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(scan), np.asarray(x))
    with pytest.raises(ConfigError, match="layer_loop must be one of"):
        chain("xla", None, layers=3, passes=2, layer_loop="while")


def test_kernel_bench_rows_agree_with_the_baselines(tmp_path):
    """jaxlora.bench.kernels (scripts/bench_kernels.py), interpreted on small shapes: every
    implementation of every row changes y (the LoRA is applied) and gives the first one's y to
    bf16 rounding: the kernels in both regimes, the prefill split with partials or atomic adds,
    the per-token kernels (chosen per row on the host, or always), and the two plain-JAX
    baselines. The report written is the one returned, with a verdict per row."""
    from jaxlora.bench import kernels

    prefill = {
        "decode_max_tokens": 0,
        "decode_shrink_max_tokens": 0,
        "shrink_block_k": 16,
        "per_token_max_rows": None,
        # larger tiles (choose_tiles) for the 24 tokens of one adapter
        "large_tiles_min_batch": 16,
        "large_tiles_min_tokens": 16,
        "large_shrink_block_tokens": 32,
        "large_shrink_block_k": 16,
        "large_expand_min_tokens": 16,
        "large_expand_min_rank": 1,
        "large_expand_block_tokens": 32,
    }
    per_token = {"decode_max_tokens": 0, "decode_shrink_max_tokens": 0, "per_token_max_rows": 10**9}
    config = kernels.KernelBenchConfig(
        tokens=(4, 24),
        outs=("2x32",),
        ranks=(8,),
        workloads=("identical", "distinct"),
        impls=(
            "sgmv",
            "sgmv:prefill",
            "sgmv:atomic",
            "sgmv:per_token",
            "gather_einsum",
            "ragged_dot",
        ),
        variants={
            "prefill": prefill,
            "atomic": {**prefill, "deterministic": False},
            "per_token": per_token,
        },
        hidden=64,
        calls=1,
        copy_gib=1 / 1024,
        flush_mib=1,
        compile_threads=2,
        interpret=True,
    )
    out_json = tmp_path / "kernels.json"
    report = kernels.run(config, str(out_json))
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(report))
    assert report["configs"]["sgmv:atomic"]["deterministic"] is False
    # The GPU's clocks over each output group and rank (none here: no nvidia-smi on the CPU).
    assert set(report["gpu"]) == {"2x32 rank 8"}
    rows = report["rows"]
    assert [(r["T"], r["workload"]) for r in rows] == [
        (4, "identical"),
        (4, "distinct"),
        (24, "identical"),
        (24, "distinct"),
    ]
    for row in rows:
        assert set(row["impls"]) == set(config.impls)
        for impl, entry in row["impls"].items():
            assert "error" not in entry, (impl, entry)
            assert entry["max_abs_y_change"] > 0.01, (row["T"], row["workload"], impl)
            assert entry["rel_err_vs_sgmv"] < 2e-2, (row["T"], row["workload"], impl)
            assert entry["busy_us"] > 0
        assert {"GBps", "pct_copy", "bandwidth_target"} <= set(row["verdict"])
    assert rows[3]["distinct_adapters"] == 24 and rows[2]["distinct_adapters"] == 1
    # The summary judges the baselines on the one non-identical row with T >= 16 and names the
    # thinnest margin of SGMV over a baseline there.
    summary = report["summary"]
    assert summary["faster_than_baselines"][1] == 1 and summary["baselines_unverified"] == 0
    assert summary["bandwidth_big"][1] + summary["bandwidth_small"][1] == 4
    margin, where = summary["thinnest_margin"]
    verdict = rows[3]["verdict"]
    assert margin == min(verdict["speedup_gather_einsum"], verdict["speedup_ragged_dot"])
    assert where.startswith("2x32 r8 T=24 distinct vs ")
    # The default chooses per token where tokens per adapter x rank <= 32: the distinct rows,
    # and 4 tokens of one rank-8 adapter (24 tokens of one are tiles); the variants force either
    # way.
    chosen = {
        impl: [row["impls"][impl].get("per_token") for row in rows]
        for impl in ("sgmv", "sgmv:prefill", "sgmv:per_token", "gather_einsum")
    }
    assert chosen == {
        "sgmv": [True, True, False, True],
        "sgmv:prefill": [False] * 4,
        "sgmv:per_token": [True] * 4,
        "gather_einsum": [None] * 4,
    }
    # Tiles as choose_tiles picks them: the default's are small below 256 tokens; the
    # variants' are large for the 24 tokens of one adapter only.
    small, large = (
        {"shrink": 16, "expand": 16, "large": False},
        {"shrink": 32, "expand": 32, "large": True},
    )
    assert [row["impls"]["sgmv"].get("tile_tokens") for row in rows] == [None, None, small, None]
    for impl in ("sgmv:prefill", "sgmv:atomic"):
        tiles = [row["impls"][impl]["tile_tokens"] for row in rows]
        assert tiles == [small, small, large, small], impl
    with pytest.raises(ConfigError, match="names no variant"):
        kernels.impl_steps(dataclasses.replace(config, impls=("sgmv:nope",)))


def test_ragged_dot_baseline_in_chunks_matches_one_call():
    """The ragged_dot baseline cut into chunks of its sorted tokens (where XLA's dense operand
    would not fit) gives the one-call result and gather + einsum's: 27 tokens (chunks of 8 and
    16, the last one padded), tokens without an adapter among them."""
    from jaxlora.bench import kernels

    config = kernels.KernelBenchConfig(hidden=64, flush_mib=1, copy_gib=1 / 1024)
    group = kernels.parse_group("2x32")
    pools = kernels.make_pools(group, 8, 256, config)  # skewed: 256 adapters
    rng = np.random.default_rng(0)
    for workload in ("skewed", "distinct"):
        work = kernels.make_workload(workload, 27, group, 8, pools, rng, config)
        tables = {k: jnp.asarray(work[k]) for k in ("ranks", "scales", "a_pages", "b_pages")}
        tables["token_slot"] = jnp.asarray(work["token_slot"]).at[jnp.array([3, 11, 26])].set(-1)
        x = jax.random.normal(jax.random.key(1), (27, 64), jnp.bfloat16)
        y = jax.random.normal(jax.random.key(2), (27, 64), jnp.bfloat16)
        args = (x, y, pools, tables, jnp.int32(1), group.weights)
        whole = kernels.step_ragged_dot(*args).astype(jnp.float32)
        einsum = kernels.step_gather_einsum(*args).astype(jnp.float32)
        assert float(jnp.max(jnp.abs(whole - y.astype(jnp.float32)))) > 0.1
        np.testing.assert_allclose(whole, einsum, rtol=2e-2, atol=2e-2)
        # 16 KiB of dense operand: chunks of 8 tokens; 64 KiB: chunks of 16
        for max_dense_bytes in (8 * 8 * 64 * 2 * 2, 16 * 16 * 64 * 2 * 2):
            chunked = kernels.step_ragged_dot(*args, max_dense_bytes=max_dense_bytes)
            np.testing.assert_allclose(chunked.astype(jnp.float32), whole, rtol=1e-2, atol=1e-2)
        # untouched rows: no adapter
        np.testing.assert_array_equal(whole[jnp.array([3, 11, 26])], y[jnp.array([3, 11, 26])])


def test_kernel_bench_flushes_by_writing_or_by_reading():
    """l2_flush: "write" adds 1 to the buffer in place, "read" leaves it as it was but for the
    last block (the sums); timed steps give the same y with either flush between them, and the
    compiled steps keep every flush (XLA removes one whose result is not used)."""
    from jaxlora.bench import kernels

    buf = jnp.arange(4 * 8192, dtype=jnp.float32)
    np.testing.assert_array_equal(kernels.l2_flush(buf, mode="write", interpret=True), buf + 1)
    read = kernels.l2_flush(buf, mode="read", interpret=True)
    np.testing.assert_array_equal(read[: 3 * 8192], buf[: 3 * 8192])  # the last block: sums
    for i in range(3):
        sums = read[3 * 8192 + 16 * i : 3 * 8192 + 16 * (i + 1)]
        np.testing.assert_array_equal(sums, jnp.sum(buf[8192 * i : 8192 * (i + 1)]))
    with pytest.raises(ConfigError, match="mode must be one of"):
        kernels.l2_flush(buf, mode="none")

    def step(x, y, pools, tables, layer, weights):
        return y * pools + x + layer

    x, pools = jnp.ones((4,), jnp.float32), jnp.float32(2.0)
    ys = []
    for flush in kernels.FLUSH_MODES:
        timed = kernels.make_timed(step, 3, (0,), num_layers=2, flush=flush, interpret=True)
        args = (jnp.zeros((4,), jnp.float32), jnp.copy(buf), x, pools, {})
        hlo = timed.lower(*args).compile().as_text()
        # interpreted, each flush's grid is a loop over the buffer's blocks: one a flush
        assert len(re.findall(r"\bwhile\(", hlo)) == 3, flush
        assert len(re.findall(r" reduce\(", hlo)) == (3 if flush == "read" else 0)
        y, _ = timed(*args)
        ys.append(np.asarray(y))
    np.testing.assert_array_equal(ys[0], ys[1])
    # y = y * 2 + 1 + layer over layers 0, 1, 0 from zeros: 1, 4, 9
    np.testing.assert_array_equal(ys[0], np.full(4, 9.0))
    with pytest.raises(ConfigError, match="--flush: expected one of"):
        kernels.KernelBenchConfig(flush="none")


def test_kernel_bench_pages_in_token_order():
    """--page_order=token_order gives out the shuffled run's pages again, ascending adapter by
    adapter in the order of each adapter's first token; the slots and ranks are unchanged."""
    from jaxlora.bench import kernels

    shuffled = kernels.KernelBenchConfig(hidden=64, flush_mib=1, copy_gib=1 / 1024)
    ordered = dataclasses.replace(shuffled, page_order="token_order")
    group = kernels.parse_group("2x32")
    pools = kernels.make_pools(group, 24, 256, shuffled)  # 2 pages an adapter's weight
    for workload in ("skewed", "distinct"):
        works = [
            kernels.make_workload(workload, 40, group, 24, pools, np.random.default_rng(3), c)
            for c in (shuffled, ordered)
        ]
        np.testing.assert_array_equal(works[0]["token_slot"], works[1]["token_slot"])
        np.testing.assert_array_equal(works[0]["ranks"], works[1]["ranks"])
        slots = list(dict.fromkeys(works[0]["token_slot"].tolist()))  # first-token order
        for name in ("a_pages", "b_pages"):
            given = works[0][name][:, list(group.weights)]
            pages = works[1][name][:, list(group.weights)]
            assert sorted(pages.ravel()) == sorted(given.ravel())
            in_order = pages[slots].ravel()
            assert (np.diff(in_order) > 0).all(), (workload, name)
            assert not (np.diff(given[slots].ravel()) > 0).all()
    with pytest.raises(ConfigError, match="--page_order: expected one of"):
        kernels.KernelBenchConfig(page_order="sorted")


def test_kernel_bench_script_names_a_bad_flag():
    """scripts/bench_kernels.py refuses bad flags with our one-line error before measuring."""
    for flag, message in (
        ("--outs=3x", "error: --outs: expected WIDTH or GxWIDTH, got '3x'"),
        ("--tokens=1,a", "error: --tokens: expected integers"),
        ("--workloads=zipf", "error: --workloads: expected some of"),
        ("--impls=sgmv:fast", "error: --impls: 'sgmv:fast' names no variant in --variants"),
        ('--variants={"fast": {"warps": 4}}', "unknown SgmvConfig field 'warps'"),
        ("--impls=cublas", "error: --impls: unknown implementation 'cublas'"),
        ("--flush=none", "value should be one of <read|write>"),
        ("--page_order=sorted", "value should be one of <shuffled|token_order>"),
    ):
        args = [flag] if not flag.startswith("--variants") else [flag, "--impls=sgmv:fast"]
        out = _run_script("bench_kernels.py", *args)
        assert out.returncode != 0 and message in out.stderr, (flag, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr

"""The engine: routing, batch invariance (chunked prefill, preemption), paged decode = recompute,
no page leaks."""

import functools
import re
import threading
from dataclasses import replace as dataclasses_replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, FinishReason, KVCacheConfig, RunnerConfig
from jaxlora.engine.runner import empty_batch
from jaxlora.errors import AdapterError, ConfigError, RequestError
from jaxlora.model import Llama, init_params
from jaxlora.sampling import SamplingParams
from jaxlora.tokenizer import tiny_tokenizer
from jaxlora.training import TrainConfig, train_adapters
from pallas_kernels.layout import MODULES
from tests.test_model import merged_params, random_lora
from tests.test_sampling import reference_processing

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def small_engine_config(**kv):
    return EngineConfig(
        kv=KVCacheConfig(**{"page_size": 4, "num_pages": 96, "max_model_len": 64, **kv}),
        runner=RunnerConfig(
            max_batch=8,
            prefill_chunk=8,
            max_prefill_rows=2,
            decode_buckets=(8,),
            prefill_buckets=(2,),
        ),
        lora_pool=LoraPoolConfig(max_rank=16, rows_per_page=4, pages_per_pool=128, max_slots=8),
        max_num_tokens=32,
        warmup=False,
    )


@pytest.fixture(scope="module")
def base():
    return init_params(TINY, 0)


@pytest.fixture(scope="module")
def lora_adapters():
    return {
        "all5": random_lora(TINY, "all5", 5, MODULES, 1),
        "qv1": random_lora(TINY, "qv1", 1, ("q_proj", "v_proj"), 2, scale=2.0),
        "mlp16": random_lora(TINY, "mlp16", 16, ("gate_proj", "up_proj", "down_proj"), 3),
    }


@jax.jit
def _full_forward(params, tokens):
    return Llama(TINY).apply({"params": params}, tokens)


def greedy_reference(params, prompt, n, width=32, forward=_full_forward):
    """Greedy decoding by recomputing the whole sequence for every token (no KV cache);
    ``forward(params, tokens)``: the model's logits (TINY's by default)."""
    seq = list(prompt)
    for _ in range(n):
        # Padding after the sequence cannot change causal logits: one compiled shape.
        logits = forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_paged_decode_equals_full_recompute_per_adapter(base, lora_adapters):
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (3, 11, 1, 17)]
    names = ["all5", None, "mlp16", "qv1"]
    outs = llm.generate(prompts, adapter=names, sampling=GREEDY)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        params = base if name is None else merged_params(base, lora_adapters[name])
        assert out.token_ids == greedy_reference(params, prompt, 8), name


def test_batch_invariance_under_chunked_prefill_and_preemption(base, lora_adapters):
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (30, 5, 19, 2, 25, 9)]
    names = ["all5", None, "qv1", "mlp16", "all5", "qv1"]
    sampling = [
        GREEDY,
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True),
    ] * 3
    # 24 KV pages of 4 tokens cannot hold all six sequences (~170 tokens): preemption happens.
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(num_pages=24),
        load_workers=0,
    )
    together = llm.generate(prompts, adapter=names, sampling=sampling)
    assert llm.engine.stats.preemptions > 0
    assert llm.engine.kv.free_pages == 24
    alone_llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    for p, a, s, got in zip(prompts, names, sampling, together, strict=True):
        alone = alone_llm.generate([p], adapter=[a], sampling=[s])[0]
        assert got.token_ids == alone.token_ids, (a, s)


def test_pages_return_after_finish_cancel_and_deadline(base, lora_adapters):
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    engine = llm.engine
    free_kv = engine.kv.free_pages
    done = llm.submit([5, 6, 7], adapter="all5", sampling=GREEDY)
    cancelled = llm.submit(
        [5, 6, 7, 8], adapter="qv1", sampling=SamplingParams(max_tokens=40, ignore_eos=True)
    )
    late = llm.submit([9, 9, 9], adapter="mlp16", sampling=GREEDY, deadline_s=-1.0)
    engine.step()
    engine.step()
    engine.cancel(cancelled.request_id)
    engine.run_until_idle()
    assert done.finish_reason is FinishReason.LENGTH and len(done.output_ids) == 8
    assert cancelled.finish_reason is FinishReason.ABORT
    assert late.finish_reason is FinishReason.DEADLINE and late.output_ids == []
    for bad in ("5", float("nan"), True):  # (NaN never passed; a string failed in the loop)
        with pytest.raises(RequestError, match="^deadline_s: expected a number"):
            llm.submit([9], sampling=GREEDY, deadline_s=bad)
    assert engine.kv.free_pages == free_kv
    stats = llm.adapters.stats()
    assert stats.referenced == 0
    llm.adapters.evict_all_unused()
    assert all(u.used_pages == 0 for u in llm.adapters.stats().pools.values())


def test_routing_each_request_gets_its_own_adapter_signature(base):
    tok = tiny_tokenizer()
    prompt = "Who are you?"
    signatures = {
        "alpha": " I am alpha.",
        "bravo": " bravo here!",
        "charlie": " 42 charlie",
        "delta": " delta, delta",
    }
    datasets = {}
    from jaxlora.data import Example

    for name, sig in signatures.items():
        ids = tok.encode(prompt)
        datasets[name] = [
            Example(
                adapter=name, prompt=tuple(ids), completion=tuple(tok.encode(sig, add_bos=False))
            )
        ]
    result = train_adapters(
        TINY,
        base,
        datasets,
        TrainConfig(rank=8, steps=120, learning_rate=1e-2, schedule="constant", batch_size=1),
        devices=jax.local_devices()[:1],
    )
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=result.adapters,
        tokenizer=tok,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    names = list(signatures) + [None]
    sampling = SamplingParams(
        temperature=0.0, max_tokens=len(max(signatures.values(), key=len)) + 2, ignore_eos=True
    )
    outs = llm.generate([prompt] * len(names), adapter=names, sampling=sampling)
    for name, out in zip(names, outs, strict=True):
        if name is None:
            assert not any(out.text.startswith(s) for s in signatures.values()), out.text
        else:
            assert out.text.startswith(signatures[name]), (name, out.text)


def test_engine_on_the_kernels_in_interpret_mode_matches_reference(base, lora_adapters):
    """The kernel path's plumbing (host-built tile metadata, paged attention) on CPU; also with
    RoPE and the K/V writes in one Pallas launch (RunnerConfig.kv_write="pallas"), prefill chunks
    and decode tokens both, and there the prefill attention block by block over blocks of 8
    keys (RunnerConfig.prefill_key_block; the second chunk of the 10-token prompt reads two)."""
    import dataclasses

    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]
    names = ["all5", "qv1"]
    sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = {}
    for impl, kv_write in (
        ("reference", "xla"),
        ("pallas_interpret", "xla"),
        ("pallas_interpret", "pallas"),
    ):
        config = small_engine_config()
        block = 8 if kv_write == "pallas" else None
        runner = dataclasses.replace(
            config.runner, impl=impl, kv_write=kv_write, prefill_key_block=block
        )
        config = dataclasses.replace(config, runner=runner)
        llm = jaxlora.LLM(
            TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )
        if kv_write == "pallas":
            step = functools.partial(llm.engine.runner._forward, mode="decode", use_lora=True)
            batch = empty_batch(8, 1, config.kv.max_pages_per_seq)
            meta = llm.engine._lora_meta([], np.asarray(batch.token_slot))
            with llm.engine._locked_lora_pools() as pools:
                args = (llm.engine.kv.k_pool, llm.engine.kv.v_pool, pools, batch, meta)
                jaxpr = str(jax.make_jaxpr(step)(llm.engine.runner.params, *args))
            # One launch rotates q, k and writes k, v: no XLA scatter.
            assert "rope_write_kv_q" in jaxpr and "scatter" not in jaxpr
        outs[impl, kv_write] = [
            o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sampling)
        ]
    assert outs["pallas_interpret", "xla"] == outs["reference", "xla"]
    assert outs["pallas_interpret", "pallas"] == outs["reference", "xla"]


def record_table_widths(llm) -> set:
    """The (mode, page-table width) of every step the LLM's engine runs from now on, as a set
    filled while it runs."""
    seen, run = set(), llm.engine.runner.run

    def spy(mode, *args, **kwargs):
        seen.add((mode, args[3].page_table.shape[1]))
        return run(mode, *args, **kwargs)

    llm.engine.runner.run = spy
    return seen


@pytest.mark.parametrize(("impl", "window"), [("pallas_interpret", None), ("reference", 6)])
def test_prefill_steps_read_the_narrowest_table_that_holds_their_rows(
    base, lora_adapters, impl, window
):
    """RunnerConfig.prefill_context_buckets: each prefill step gets the page table cut to the
    narrowest bucket (in whole pages) that holds its longest row's context, the whole table
    past the last: prompts of 3, 10 and 30 tokens in 8-token chunks over a 16-page table at
    buckets of 8 and 24 keys (2 and 6 pages) run steps at 2, 6 and 16 pages, decode steps at
    16, and give the tokens and prompt logprobs of the reference engine that always reads the
    whole table (with adapters and without): the cut engine on the Pallas K/V write and
    attention in interpret mode; and on the reference path with a 6-key sliding window,
    narrower than every bucket, whose prefill reads the window's pages of the whole table."""
    import dataclasses

    model = TINY
    if window is not None:
        model = dataclasses.replace(TINY, model_type="mistral", sliding_window=window)

    prompts = [[5, 6, 7], list(range(20, 30)), list(range(40, 70))]
    names = ["all5", None, "qv1"]
    sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=0)
    outs, widths = {}, {}
    for buckets in ((), (24, 8)):
        config = small_engine_config()
        runner = dataclasses.replace(config.runner, prefill_context_buckets=buckets)
        if buckets and impl != "reference":
            runner = dataclasses.replace(runner, impl=impl, kv_write="pallas")
        config = dataclasses.replace(config, runner=runner)
        assert runner.prefill_context_buckets == tuple(sorted(buckets))
        llm = jaxlora.LLM(
            model, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )
        seen = record_table_widths(llm)
        try:
            outs[buckets] = llm.generate(prompts, adapter=names, sampling=sampling)
        finally:
            llm.stop()
        widths[buckets] = seen
    assert widths[()] == {("prefill", 16), ("decode", 16)}
    assert widths[(24, 8)] == {("prefill", 2), ("prefill", 6), ("prefill", 16), ("decode", 16)}
    for whole, cut in zip(outs[()], outs[(24, 8)], strict=True):
        assert cut.token_ids == whole.token_ids
        np.testing.assert_allclose(
            np.asarray(cut.prompt_logprobs[1:], np.float32),
            np.asarray(whole.prompt_logprobs[1:], np.float32),
            atol=1e-5,
        )


def test_prefill_table_widths_follow_the_context_buckets():
    """RunnerConfig.prefill_table_widths / prefill_table_width: the buckets in whole pages
    where narrower than the table, then the table; a step gets the narrowest that holds its
    context. Bad buckets name the field."""
    runner = RunnerConfig(prefill_context_buckets=(100, 16, 4096, 16))
    assert runner.prefill_context_buckets == (16, 100, 4096)
    assert runner.prefill_table_widths(max_pages=256, page_size=16) == (1, 7, 256)
    assert runner.prefill_table_widths(max_pages=32, page_size=16) == (1, 7, 32)
    assert RunnerConfig(prefill_context_buckets=()).prefill_table_widths(32, 16) == (32,)
    assert RunnerConfig().prefill_table_widths(32, 16) == (32,)  # 4096 keys: the table's
    assert RunnerConfig().prefill_table_widths(2048, 16) == (32, 128, 256, 512, 1024, 2048)
    # (past 4,096 keys the default widths double: max_model_len 131,072)
    assert RunnerConfig().prefill_table_widths(8192, 16)[3:] == (512, 1024, 2048, 4096, 8192)
    width = functools.partial(runner.prefill_table_width, max_pages=32, page_size=16)
    assert [width(n) for n in (1, 16, 17, 112, 113, 512)] == [1, 1, 7, 7, 32, 32]
    for bad in ((0,), (16, -4), (True,), "4096", (4096.0,)):
        with pytest.raises(ConfigError, match="prefill_context_buckets: expected a tuple of"):
            RunnerConfig(prefill_context_buckets=bad)


def test_compilations_are_bounded_by_the_buckets(base, lora_adapters):
    from jaxlora.engine.runner import bucket

    runner = RunnerConfig(max_batch=32, max_prefill_rows=6)
    assert runner.buckets("decode") == (1, 2, 4, 8, 16, 32)
    assert runner.buckets("prefill") == (1, 2, 4, 6)
    assert bucket(5, runner.buckets("decode")) == 8 and bucket(6, runner.buckets("prefill")) == 6
    import dataclasses

    # (a context bucket of 8 keys: prefill steps at a 2-page table and the whole one)
    config = dataclasses.replace(small_engine_config(), warmup=True)
    config = dataclasses.replace(
        config, runner=dataclasses.replace(config.runner, prefill_context_buckets=(8,))
    )
    step_compiles, sampler_compiles = [], []

    def on_warmup_event(event, duration, **kwargs):
        if event.endswith("backend_compile_duration") and "_forward" in str(kwargs):
            step_compiles.append(kwargs)
        if event.endswith("backend_compile_duration") and "sample_step" in str(kwargs):
            sampler_compiles.append(threading.current_thread().name)

    # (the samplers' shapes are other tests' too: compiled here, not found in a cache)
    from jaxlora.engine.runner import sample_step

    sample_step.clear_cache()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax.monitoring.register_event_duration_secs_listener(on_warmup_event)
    try:
        llm = jaxlora.LLM(
            TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(on_warmup_event)
        jax.config.update("jax_enable_compilation_cache", cache)
    warmed = set(llm.engine.runner.compiled_shapes)
    # compiled in parallel, once each: running the buckets afterwards hit JAX's cache
    shapes = llm.engine.runner.bucket_shapes(config.kv.max_pages_per_seq, config.kv.page_size)
    assert len(step_compiles) == len(warmed) == 2 * len(shapes)
    assert len(warmed) == 2 * len(shapes)  # with and without LoRA
    # Each bucket's four sampler variants, once each, on the compile threads (one after the
    # other on the engine's thread, they took longer than all the steps together).
    buckets = {(mode, rows) for mode, rows, *_ in shapes}
    assert len(sampler_compiles) == 4 * len(buckets)
    assert threading.current_thread().name not in sampler_compiles
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (1, 9, 30, 4, 12)]
    compiled = []

    def on_event(event, duration, **kwargs):
        # The adapter manager's page scatter compiles once per page-count bucket the first time
        # an adapter of that size lands; everything else must have been compiled by warm-up.
        if event.endswith("backend_compile_duration") and "_scatter_pages" not in str(kwargs):
            compiled.append(kwargs)

    step_cache = llm.engine.runner._step._cache_size()
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        llm.generate(prompts, adapter=["all5", None, "qv1", "mlp16", None], sampling=GREEDY)
        # sampled rows with top-p / top-k and logprobs use sampler variants warmed up too
        llm.generate(
            prompts[:3],
            adapter=["qv1", None, "all5"],
            sampling=SamplingParams(
                temperature=0.8, top_p=0.9, top_k=5, logprobs=3, max_tokens=4, seed=1
            ),
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert llm.engine.runner.compiled_shapes == warmed  # serving compiled nothing new ...
    assert llm.engine.runner._step._cache_size() == step_cache  # ... by jit's own count too
    assert not compiled, f"XLA compilations while serving: {compiled}"


def test_unrolled_layer_loop_generates_the_scan_tokens(base, lora_adapters):
    """layer_loop='unrolled' (no per-layer weight copies on the GPU) is the same function
    as the lax.scan loop: same greedy tokens through paged decode and mixed adapters."""
    import dataclasses

    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (6, 13, 2)]
    names = ["all5", None, "qv1"]
    outs = {}
    # scan_unroll=3 over 2 layers: lax.scan's remainder path too.
    for loop, unroll in (("scan", 1), ("unrolled", 1), ("scan", 3)):
        config = small_engine_config()
        runner = dataclasses.replace(config.runner, layer_loop=loop, scan_unroll=unroll)
        config = dataclasses.replace(config, runner=runner)
        llm = jaxlora.LLM(
            TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )
        model = llm.engine.runner.model
        assert model.scan_layers == (loop == "scan") and model.scan_unroll == unroll
        outs[loop, unroll] = [
            o.token_ids for o in llm.generate(prompts, adapter=names, sampling=GREEDY)
        ]
    assert outs["unrolled", 1] == outs["scan", 1] == outs["scan", 3]
    # unrolled layers on the kernel path (interpret mode here)
    config = small_engine_config()
    config = dataclasses.replace(
        config,
        runner=dataclasses.replace(config.runner, layer_loop="unrolled", impl="pallas_interpret"),
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    kernel_outs = [
        o.token_ids for o in llm.generate(prompts[::2], adapter=names[::2], sampling=short)
    ]
    assert kernel_outs == [out[:2] for out in outs["scan", 1][::2]]
    assert RunnerConfig().scan_layers()
    with pytest.raises(ConfigError, match="layer_loop"):
        RunnerConfig(layer_loop="sideways")
    with pytest.raises(ConfigError, match="scan_unroll: expected an int >= 1 or None, got 0"):
        RunnerConfig(scan_unroll=0)
    assert RunnerConfig().scan_unroll is None  # per step: jaxlora.model.scan_unroll_for_step


def test_projection_kernel_auto_picks_lora_matmul_for_the_compiled_scan():
    """Decode projections run through lora_matmul by default only where it was measured faster
    (the compiled kernels in the scan loop); asked for, it runs with any Pallas impl."""

    assert RunnerConfig().projection_kernel_for("pallas") == "pallas"
    assert RunnerConfig().projection_kernel_for("pallas_interpret") == "xla"
    assert RunnerConfig().projection_kernel_for("reference") == "xla"
    assert RunnerConfig(layer_loop="unrolled").projection_kernel_for("pallas") == "xla"
    assert RunnerConfig(projection_kernel="xla").projection_kernel_for("pallas") == "xla"
    pallas = RunnerConfig(projection_kernel="pallas", layer_loop="unrolled")
    assert pallas.projection_kernel_for("pallas_interpret") == "pallas_interpret"
    assert pallas.projection_kernel_for("reference") == "xla"
    with pytest.raises(ConfigError, match="projection_kernel: expected 'auto', 'xla' or 'pallas'"):
        RunnerConfig(projection_kernel="cublas")
    with pytest.raises(ConfigError, match="kv_write: expected 'xla' or 'pallas', got 'triton'"):
        RunnerConfig(kv_write="triton")
    with pytest.raises(ConfigError, match="residual_norm: expected 'xla' or 'pallas', got 'on'"):
        RunnerConfig(residual_norm="on")
    with pytest.raises(ConfigError, match="residual_norm_warps: expected a power of two"):
        RunnerConfig(residual_norm_warps=6)
    with pytest.raises(ConfigError, match="norm_shrink: needs residual_norm='pallas'.*'xla'"):
        RunnerConfig(residual_norm="xla", norm_shrink=True)
    with pytest.raises(ConfigError, match="swiglu_shrink: needs residual_norm='pallas'.*'xla'"):
        RunnerConfig(residual_norm="xla", swiglu_shrink=True)
    with pytest.raises(ConfigError, match="swiglu_shrink: expected a bool, got 1"):
        RunnerConfig(swiglu_shrink=1)
    with pytest.raises(ConfigError, match="norm_shrink: expected a bool, got 'yes'"):
        RunnerConfig(norm_shrink="yes")
    with pytest.raises(
        ConfigError, match="fused_shrink_rows: expected a power of two >= 1, got 12"
    ):
        RunnerConfig(norm_shrink=True, fused_shrink_rows=12)
    with pytest.raises(
        ConfigError, match="'prompt_logprobs_positions': expected a positive int, got 0"
    ):
        RunnerConfig(prompt_logprobs_positions=0)
    with pytest.raises(ConfigError, match="'prefill_key_block': expected a positive int, got 0"):
        RunnerConfig(prefill_key_block=0)
    assert RunnerConfig(prefill_key_block=None).prefill_key_block is None


def test_deterministic_runner_sums_the_shrink_split_in_one_order():
    """RunnerConfig.deterministic runs the SGMV kernels with SgmvConfig.deterministic: a split
    shrink writes partials summed in one fixed order instead of adding with atomics. Any other
    tuning of the sgmv config is kept. On by default (in both configs); the runner's field
    decides the kernels' whatever the sgmv config says."""
    import dataclasses

    from pallas_kernels.sgmv import SgmvConfig

    assert RunnerConfig(deterministic=True).sgmv_config() == SgmvConfig(deterministic=True)
    tuned = SgmvConfig(decode_max_tokens=32, shrink_split_k=4)
    assert RunnerConfig(sgmv=tuned, deterministic=True).sgmv_config() == SgmvConfig(
        decode_max_tokens=32, shrink_split_k=4, deterministic=True
    )
    assert RunnerConfig().deterministic and SgmvConfig().deterministic
    assert RunnerConfig().sgmv_config() == SgmvConfig()
    assert RunnerConfig(sgmv=tuned).sgmv_config() == tuned
    atomic = SgmvConfig(deterministic=False)
    assert RunnerConfig(deterministic=False).sgmv_config() == atomic
    assert RunnerConfig(sgmv=tuned, deterministic=False).sgmv_config() == dataclasses.replace(
        tuned, deterministic=False
    )
    assert RunnerConfig(sgmv=atomic).sgmv_config() == SgmvConfig()
    with pytest.raises(ConfigError, match="deterministic: expected a bool, got 'yes'"):
        RunnerConfig(deterministic="yes")
    with pytest.raises(ConfigError, match="'deterministic': expected a bool, got 1"):
        SgmvConfig(deterministic=1)


def test_fused_projections_generate_the_separate_weights_tokens(base, lora_adapters):
    """The engine fuses q|k|v and gate|up by default (one GEMM per group); with the option off it
    runs the separate weights. Same greedy tokens through prefill, paged decode, mixed adapters."""
    import dataclasses

    from jaxlora.model import projections_fused

    rng = np.random.default_rng(6)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (9, 3, 14)]
    names = ["mlp16", "all5", None]
    outs = {}
    for fuse in (True, False):
        config = small_engine_config()
        config = dataclasses.replace(
            config, runner=dataclasses.replace(config.runner, fuse_projections=fuse)
        )
        llm = jaxlora.LLM(
            TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )
        assert projections_fused(llm.params) == fuse
        outs[fuse] = [o.token_ids for o in llm.generate(prompts, adapter=names, sampling=GREEDY)]
    assert outs[True] == outs[False]
    assert outs[True][1] == greedy_reference(
        merged_params(base, lora_adapters["all5"]), prompts[1], len(outs[True][1])
    )


@pytest.mark.parametrize("fuse", [True, False])
def test_a_loaded_checkpoint_runs_from_device_memory(tmp_path, base, fuse):
    """A HF checkpoint loads as numpy arrays; the engine puts every leaf on the device once (a
    host leaf would be copied to the device by every step) and fuses on the host."""
    import dataclasses

    from jaxlora.formats.hf import save_hf_checkpoint
    from jaxlora.model import projections_fused

    save_hf_checkpoint(tmp_path, TINY, jax.tree.map(np.asarray, base))
    config = small_engine_config()
    config = dataclasses.replace(
        config, runner=dataclasses.replace(config.runner, fuse_projections=fuse)
    )
    llm = jaxlora.LLM(str(tmp_path), engine_config=config, load_workers=0)
    leaves = jax.tree.leaves(llm.params)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves), {type(x) for x in leaves}
    assert projections_fused(llm.params) == fuse
    prompt = [5, 9, 2, 7]
    out = llm.generate([prompt], sampling=SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out.token_ids == greedy_reference(base, prompt, 4)


def test_replace_mid_generation_serves_each_request_its_own_version(base, lora_adapters):
    """A request admitted before `replace` keeps the old weights to its last token while a
    request admitted after it, in the same steps, gets the new ones: two versions of one name
    are two slots, never one (which would serve one of them the other's weights)."""
    old, new = lora_adapters["all5"], random_lora(TINY, "all5", 5, MODULES, 11)
    prompt_old, prompt_new = [5, 6, 7, 8], [9, 10, 11, 12]
    sampling = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters={"all5": old},
        engine_config=small_engine_config(),
        load_workers=0,
    )
    first = llm.submit(prompt_old, adapter="all5", sampling=sampling)
    for _ in range(3):  # async scheduling: the prefill's token is read one iteration later
        llm.engine.step()
    assert 0 < len(first.output_ids) < 6  # decoding on version 1
    llm.adapters.replace("all5", new)
    second = llm.submit(prompt_new, adapter="all5", sampling=sampling)
    llm.engine.run_until_idle()
    assert first.adapter_handle is None and second.finish_reason is FinishReason.LENGTH
    assert first.output_ids == greedy_reference(merged_params(base, old), prompt_old, 6)
    assert second.output_ids == greedy_reference(merged_params(base, new), prompt_new, 6)


def test_a_merged_adapter_computes_the_weighted_sum_of_its_parts(base, lora_adapters):
    """AdapterStore.merged_weights (PEFT's add_weighted_adapter "cat"): an adapter merged from
    three registered ones of different ranks, scales and modules, one weight negative, gives
    the greedy tokens of the base model with the three weighted updates folded in, beside one
    of its parts in the same batch; a merge whose ranks pass the pool's max_rank is refused."""
    parts = [("all5", 0.7), ("qv1", -0.4), ("mlp16", 0.25)]
    sampling = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    config = small_engine_config()
    wide_pool = dataclasses_replace(config.lora_pool, max_rank=32)
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=dataclasses_replace(config, lora_pool=wide_pool),
        load_workers=0,
    )
    merged = llm.adapters.store.merged_weights("mix", parts)
    assert merged.ranks == {
        "q_proj": 6,
        "k_proj": 5,
        "v_proj": 6,
        "o_proj": 5,
        "gate_proj": 21,
        "up_proj": 21,
        "down_proj": 21,
    }
    with pytest.raises(
        AdapterError, match=r"'gate_proj' would have rank 37 \(5 \+ 16 \+ 16\); expected at most 32"
    ):
        llm.adapters.store.merged_weights("too_big", [("all5", 1), ("mlp16", 1), ("mlp16", 2)])
    llm.merge_adapters("mix", parts)
    assert llm.adapters.store.get("mix").footprint.ranks == tuple(merged.ranks.values())
    expected = base
    for name, weight in parts:
        part = lora_adapters[name]
        scaled = dataclasses_replace(part, scales={m: s * weight for m, s in part.scales.items()})
        expected = merged_params(expected, scaled)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    mix, alone = llm.generate(prompts, adapter=["mix", "all5"], sampling=sampling)
    assert mix.token_ids == greedy_reference(expected, prompts[0], 6)
    assert alone.token_ids == greedy_reference(
        merged_params(base, lora_adapters["all5"]), prompts[1], 6
    )


def test_max_slots_holds_for_requests_readmitted_after_preemption(base, lora_adapters):
    """Distinct adapter versions in the running set never exceed max_slots, whatever the
    admission path (first admission, or re-admission of a preempted request that kept its
    adapter handle)."""
    import dataclasses

    config = small_engine_config(num_pages=14)  # page_size 4: preemptions with 6 requests
    config = dataclasses.replace(
        config, lora_pool=dataclasses.replace(config.lora_pool, max_slots=2)
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    engine = llm.engine
    rng = np.random.default_rng(9)
    names = ["all5", "qv1", "mlp16", "all5", "qv1", "mlp16"]
    requests = [
        llm.submit(
            list(map(int, rng.integers(3, 500, 5))),
            adapter=name,
            sampling=SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        )
        for name in names
    ]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine._distinct_adapters()))
        assert most <= 2
    assert engine.stats.preemptions > 0
    assert all(r.finish_reason is FinishReason.LENGTH for r in requests), [
        (r.finish_reason, r.error) for r in requests
    ]
    for request, name in zip(requests, names, strict=True):
        expected = greedy_reference(
            merged_params(base, lora_adapters[name]), request.prompt_ids, 10
        )
        assert request.output_ids == expected, name


def test_deadline_aborts_an_admitted_request_that_can_no_longer_make_it(base, lora_adapters):
    """S-LoRA's early abort also covers requests already admitted but without a first token (a
    prompt half prefilled): with the measured step time, the chunks it still needs overrun its
    deadline, so it is aborted with a reason and its pages come back; a request without a
    deadline is untouched."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    engine = llm.engine
    free_kv = engine.kv.free_pages
    long_prompt = list(range(3, 43))  # 5 chunks of 8
    doomed = llm.submit(long_prompt, adapter="all5", sampling=GREEDY, deadline_s=30.0)
    calm = llm.submit(long_prompt, adapter="qv1", sampling=GREEDY)
    for _ in range(5):  # admitted, adapter copied, first chunk prefilled
        engine.step()
        if doomed.num_computed:
            break
    assert doomed in engine._running and 0 < doomed.num_computed < len(long_prompt) - 16
    engine.stats.step_time_ema = 10.0  # 4 chunks left x 10 s > the 30 s left
    engine.step()
    assert doomed.finish_reason is FinishReason.DEADLINE and not doomed.output_ids
    assert "deadline" in doomed.error
    engine.run_until_idle()
    assert calm.finish_reason is FinishReason.LENGTH and len(calm.output_ids) == 8
    assert engine.kv.free_pages == free_kv and llm.adapters.stats().referenced == 0


def test_reap_walks_the_queue_only_for_a_cancel_or_a_first_token_deadline(base, lora_adapters):
    """Engine._reap (cancellations, first-token deadlines) walks the running and waiting
    requests only while a cancelled request is unfinished or a request with a deadline awaits
    its first token: none of its queue walks in an iteration of a queue without either, and a
    cancel or a deadline given later is still acted on."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    engine = llm.engine
    walks, reaping = [], []  # (_admit orders the queue too: only _reap's walks count)
    queue_order, reap = engine._queue_order, engine._reap
    engine._queue_order = lambda: (reaping and walks.append(1)) or queue_order()

    def spied_reap():
        reaping.append(1)
        try:
            reap()
        finally:
            reaping.pop()

    engine._reap = spied_reap
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    queued = [llm.submit([5, 6, 7 + i], adapter="all5", sampling=sampling) for i in range(12)]
    engine.step()
    assert walks == [] and engine._cancelled == set() and engine._deadline_requests == set()
    engine.cancel(queued[-1].request_id)  # still waiting
    assert engine._cancelled == {queued[-1]}
    engine.step()
    assert queued[-1].finish_reason is FinishReason.ABORT and engine._cancelled == set()
    late = llm.submit([9, 9, 9], adapter="qv1", sampling=GREEDY, deadline_s=-1.0)
    engine.step()
    assert walks and late.finish_reason is FinishReason.DEADLINE
    walks.clear()
    engine.step()
    assert walks == [] and engine._deadline_requests == set()
    engine.run_until_idle()
    assert all(r.finish_reason is FinishReason.LENGTH for r in queued[:-1])


def test_submit_refuses_what_it_cannot_honour(base):
    from jaxlora.errors import RequestError

    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    with pytest.raises(RequestError, match="stop_token_ids"):
        llm.engine.submit([5, 6], sampling=SamplingParams(stop_token_ids=(TINY.vocab_size,)))
    assert llm.engine.tokenizer is None  # an engine on token ids alone: no text to match
    with pytest.raises(RequestError, match="stop strings need a tokenizer"):
        llm.engine.submit([5, 6], sampling=SamplingParams(stop_strings=("x",)))
    assert not llm.engine.has_work()


def test_a_failed_adapter_load_fails_its_requests_only_and_leaks_nothing(
    base, lora_adapters, tmp_path
):
    """An adapter whose file broke after registration (headers were fine then): its requests end
    with an error naming the adapter, a request cancelled while still queued ends too, the
    others are served, and every KV page and adapter reference comes back."""
    import os

    from tests.peft_util import write_random_peft_adapter

    path = write_random_peft_adapter(tmp_path / "broken", TINY, rank=4, seed=3)
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    llm.register_adapter("broken", path)
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(weights, "r+b") as f:  # corrupt the data section, keep the size
        f.seek(os.path.getsize(weights) // 2)
        f.write(b"\xff" * 64)
    os.truncate(weights, os.path.getsize(weights) - 8)  # and cut the end: a truncated download
    engine = llm.engine
    free_kv = engine.kv.free_pages
    failing = llm.submit([5, 6, 7], adapter="broken", sampling=GREEDY)
    fine = llm.submit([5, 6, 7], adapter="qv1", sampling=GREEDY)
    queued = llm.submit([8, 9], adapter="all5", sampling=GREEDY)
    engine.cancel(queued.request_id)
    engine.run_until_idle()
    assert failing.finish_reason is FinishReason.ERROR and "broken" in failing.error
    assert fine.finish_reason is FinishReason.LENGTH and len(fine.output_ids) == 8
    assert queued.finish_reason is FinishReason.ABORT and not queued.output_ids
    assert engine.kv.free_pages == free_kv and llm.adapters.stats().referenced == 0
    llm.adapters.evict_all_unused()
    assert all(u.used_pages == 0 for u in llm.adapters.stats().pools.values())


def test_packed_step_inputs_round_trip_every_dtype():
    from jaxlora.engine.runner import PackedInputs

    rng = np.random.default_rng(0)
    tree = (
        {
            "ids": rng.integers(-5, 9, (3, 4)).astype(np.int32),
            "valid": rng.random((2, 5)) < 0.5,
            "none": None,
        },
        {
            "scales": rng.standard_normal((4, 7)).astype(np.float32),
            "wide": np.array([2**31 - 1, -(2**31)], np.int64),
            "empty": np.zeros((0, 3), np.int32),
        },
    )
    packed = PackedInputs.pack(tree)
    assert packed.buffer.dtype == np.int32 and packed.buffer.shape == (12 + 10 + 28 + 2,)
    back = jax.jit(PackedInputs.unpack, static_argnums=(1, 2))(
        packed.buffer, packed.treedef, packed.layout
    )
    assert back[0]["none"] is None
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)  # float32 bit for bit
    assert back[0]["valid"].dtype == jnp.bool_ and back[1]["scales"].dtype == jnp.float32
    with pytest.raises(ValueError, match="does not fit int32"):
        PackedInputs.pack({"x": np.array([2**31], np.int64)})
    with pytest.raises(TypeError, match="float64"):
        PackedInputs.pack({"x": np.zeros(2)})


@pytest.mark.parametrize("use_lora", [False, True])
def test_a_step_makes_one_host_to_device_transfer(base, lora_adapters, use_lora):
    """The batch and the LoRA and kernel metadata travel packed in one transfer: the compiled
    step gets one host array and device arrays otherwise; with the caller's implicit
    host-to-device transfers disallowed, a step still runs and gives the logits of the unpacked
    inputs."""
    import dataclasses

    config = small_engine_config()
    config = dataclasses.replace(
        config, runner=dataclasses.replace(config.runner, impl="pallas_interpret")
    )
    engine, runner, (handle,), batch = _decode_step_of_tiny(base, lora_adapters, ("all5",), config)
    meta = engine._lora_meta([handle.slot_info], batch.token_slot)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(meta))
    with engine._locked_lora_pools() as pools:
        expected = jax.jit(runner._forward, static_argnames=("mode", "use_lora"))(
            runner.params,
            engine.kv.k_pool,
            engine.kv.v_pool,
            pools,
            batch,
            meta,
            mode="decode",
            use_lora=use_lora,
        )[0]
        step, calls = runner._step, []

        def spy(*args, **static):
            calls.append(args)
            return step(*args, **static)

        runner._step = spy
        try:
            with jax.transfer_guard_host_to_device("disallow"):
                logits, engine.kv.k_pool, engine.kv.v_pool = runner.run(
                    "decode", engine.kv.k_pool, engine.kv.v_pool, pools, batch, meta, use_lora
                )
        finally:
            runner._step = step
    handle.release()
    (args,) = calls
    host = [leaf for leaf in jax.tree.leaves(args) if not isinstance(leaf, jax.Array)]
    assert len(host) == 1 and isinstance(host[0], np.ndarray) and host[0].ndim == 1
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_request_tokens_slice_the_sequence_without_building_it():
    from jaxlora.engine.request import Request

    request = Request("r", [10, 11, 12, 13], GREEDY)
    request.output_ids.extend([20, 21, 22])
    sequence = request.prompt_ids + request.output_ids
    assert request.sequence_len == len(sequence) == 7
    for start in range(8):
        for n in range(8 - start):
            assert request.tokens(start, n) == sequence[start : start + n], (start, n)


def test_async_scheduling_gives_the_sync_outputs(base, lora_adapters):
    """Async scheduling (each iteration dispatched before the previous one's tokens are read,
    decode rows taking their token from the device) gives every request the tokens, logprobs,
    text and finish reason of the synchronous engine: with preemptions (a small KV pool),
    mixed adapters, seeded sampling with top-k / top-p and logprobs, a stop token (its
    request's next row is computed and dropped), a stop string, and the context length."""
    import dataclasses

    tokenizer = tiny_tokenizer()
    prompts = [
        [5, 6, 7, 8],
        list(range(40, 52)),
        [300, 301],
        [9, 10, 11],
        [77] * 6,
        [120, 121, 122, 123, 124],
    ]
    adapters = ["all5", None, "qv1", "mlp16", "all5", None]
    probe = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        tokenizer=tokenizer,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    probed = probe.generate(
        prompts[:2],
        adapter=adapters[:2],
        sampling=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    )
    stop_token = probed[0].token_ids[3]
    stop_text = tokenizer.decode(probed[1].token_ids[2:4]).strip()
    assert stop_token not in probed[0].token_ids[:3] and stop_text
    samplings = [
        SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=12, stop_strings=[stop_text]),
        SamplingParams(
            temperature=0.9, top_p=0.8, top_k=20, max_tokens=10, seed=3, logprobs=3, ignore_eos=True
        ),
        SamplingParams(temperature=0.7, max_tokens=9, seed=11, logprobs=0, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40 - 6, ignore_eos=True),  # the context
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    ]

    def serve(async_scheduling):
        config = dataclasses.replace(
            small_engine_config(num_pages=11, max_model_len=40), async_scheduling=async_scheduling
        )
        llm = jaxlora.LLM(
            TINY,
            params=base,
            adapters=lora_adapters,
            tokenizer=tokenizer,
            engine_config=config,
            load_workers=0,
        )
        engine, run = llm.engine, llm.engine.runner.run
        from_device = []

        def spy(mode, *args, register=None):
            from_device.append(int((args[3].token_src >= 0).sum()))
            return run(mode, *args, register=register)

        engine.runner.run = spy
        requests = [
            llm.submit(p, adapter=a, sampling=s)
            for p, a, s in zip(prompts, adapters, samplings, strict=True)
        ]
        engine.run_until_idle()
        assert engine.kv.free_pages == config.kv.num_pages
        return requests, engine.stats, sum(from_device)

    sync, sync_stats, sync_from_device = serve(False)
    served, stats, from_device = serve(True)
    assert sync_from_device == 0 and from_device > 0
    assert sync_stats.preemptions > 0 and stats.preemptions > 0
    assert [r.finish_reason for r in sync] == [
        FinishReason.STOP,
        FinishReason.STOP,
        FinishReason.LENGTH,
        FinishReason.LENGTH,
        FinishReason.LENGTH,
        FinishReason.LENGTH,
    ]
    assert sync[0].output_ids[-1] == stop_token and len(sync[4].output_ids) == 40 - 6
    for expected, got in zip(sync, served, strict=True):
        assert got.output_ids == expected.output_ids
        assert (got.finish_reason, got.text) == (expected.finish_reason, expected.text)
        np.testing.assert_allclose(got.output_logprobs, expected.output_logprobs, atol=1e-5)
        assert [sorted(t) for t in got.output_top_logprobs] == [
            sorted(t) for t in expected.output_top_logprobs
        ]


def processed_greedy_reference(params, prompt, sampling, width=40):
    """Greedy decoding with the request's logit processing (``reference_processing``: dense
    numpy over the whole output so far) by recomputing the sequence for every token; stops at
    a stop token once min_tokens are out (the engine has no EOS here)."""
    out = []
    for index in range(sampling.max_tokens):
        seq = prompt + out
        logits = _full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32))
        row = np.asarray(logits[0, len(seq) - 1])[None]
        processed = reference_processing(row, [sampling], [prompt], [out], [index], ())
        out.append(int(processed[0].argmax()))
        if index >= sampling.min_tokens and out[-1] in sampling.stop_token_ids:
            break
    return out


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_logit_processing_gives_the_recomputed_reference_tokens(base, async_scheduling):
    """Greedy requests with logit bias, presence / frequency / repetition penalties and
    min_tokens, sharing steps with a plain request, under async scheduling (a row's newest
    output token is still on the device: read from the token register) and synchronous, with
    preemptions: each gets the tokens of a full recompute with the same processing."""
    import dataclasses

    # Greedy, prompts 0 and 4 repeat themselves within 12 tokens (8 and 5 repeats).
    prompts = [[5, 6] * 3, [316, 145, 489], [336, 403, 14], [77] * 6, [76, 499, 97, 327], [9, 8]]
    plain = [greedy_reference(base, p, 12, width=40) for p in prompts]  # unprocessed
    samplings = [
        SamplingParams(temperature=0, max_tokens=12, frequency_penalty=2.0),
        # Row 1's second token depends on its first, which is still on the device when the
        # next iteration's prefill rows (2, 3) rewrite the register slot it was sampled into.
        SamplingParams(temperature=0, max_tokens=12, frequency_penalty=-2, repetition_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=12, logit_bias={plain[2][1]: -100, 77: 4.0}),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=5, stop_token_ids=[plain[3][0]]),
        SamplingParams(temperature=0, max_tokens=12, presence_penalty=2, repetition_penalty=1.8),
        SamplingParams(temperature=0, max_tokens=12),
    ]
    config = dataclasses.replace(
        small_engine_config(num_pages=11, max_model_len=40), async_scheduling=async_scheduling
    )
    llm = jaxlora.LLM(TINY, params=base, engine_config=config, load_workers=0)
    outs = llm.generate(prompts, sampling=samplings)
    assert llm.engine.stats.preemptions > 0
    assert llm.engine.kv.free_pages == config.kv.num_pages
    for prompt, sampling, out, unprocessed in zip(prompts, samplings, outs, plain, strict=True):
        expected = processed_greedy_reference(base, prompt, sampling)
        assert out.token_ids == expected, sampling
        if sampling.processes_logits:
            assert expected != unprocessed[: len(expected)], sampling  # the processing bites
    # min_tokens held the stop token back for 5 tokens (unprocessed it came first).
    assert plain[3][0] not in outs[3].token_ids[:5]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_prompt_logprobs_are_the_full_forward_ones(base, lora_adapters, async_scheduling):
    """Prompt logprobs (each prompt token's logprob given the tokens before it, and the n most
    likely there) over prompts of several prefill chunks, with adapters, beside requests that
    do not ask, with preemptions: those of a full forward of the prompt with the merged
    adapter; the first token has none. The generated tokens are not changed."""
    import dataclasses

    rng = np.random.default_rng(8)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (19, 7, 2, 26, 1)]
    names = ["all5", None, "qv1", "mlp16", None]
    asked = [3, None, 0, 20, 2]
    config = dataclasses.replace(
        small_engine_config(num_pages=13, max_model_len=40), async_scheduling=async_scheduling
    )
    # The LM head over 3 positions at a time: chunks of 8 in 3 slices, the last one padded.
    config = dataclasses.replace(
        config, runner=dataclasses.replace(config.runner, prompt_logprobs_positions=3)
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    samplings = [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=n)
        for n in asked
    ]
    outs = llm.generate(prompts, adapter=names, sampling=samplings)
    assert llm.engine.stats.preemptions > 0
    assert llm.engine.kv.free_pages == config.kv.num_pages
    for prompt, name, n, out in zip(prompts, names, asked, outs, strict=True):
        params = base if name is None else merged_params(base, lora_adapters[name])
        assert out.token_ids == greedy_reference(params, prompt, 8, width=40)
        if n is None:
            assert out.prompt_logprobs is None and out.prompt_top_logprobs is None
            continue
        logits = _full_forward(params, jnp.array([prompt + [0] * (40 - len(prompt))]))[0]
        expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        assert len(out.prompt_logprobs) == len(prompt) == len(out.prompt_top_logprobs)
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
        assert out.prompt_logprob_ranks[0] is None and len(out.prompt_logprob_ranks) == len(prompt)
        for p in range(1, len(prompt)):
            np.testing.assert_allclose(
                out.prompt_logprobs[p], expected[p - 1, prompt[p]], rtol=1e-5, atol=1e-5
            )
            assert out.prompt_logprob_ranks[p] == 1 + np.sum(
                expected[p - 1] > expected[p - 1, prompt[p]]
            )
            top = out.prompt_top_logprobs[p]
            best = np.argsort(-expected[p - 1])[:n]
            assert list(top) == [int(t) for t in best]
            np.testing.assert_allclose(list(top.values()), expected[p - 1, best], atol=1e-5)


def test_prefix_caching_reuses_pages_of_the_same_prefix_and_adapter(base, lora_adapters):
    """KVCacheConfig.prefix_caching: a request whose prompt starts with full pages another
    request of the same adapter version computed takes those pages instead of computing them
    (another adapter, or the base model, does not: its K/V differ); every output is a full
    recompute's; preempted requests come back through the cache; pages all return."""
    import dataclasses

    rng = np.random.default_rng(11)
    shared = list(map(int, rng.integers(3, 500, 18)))  # 4 full pages of 4 tokens, and 2
    config = small_engine_config(num_pages=40, prefix_caching=True)
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    kv, stats = llm.engine.kv, llm.engine.stats

    def expect(prompt, name, out):
        params = base if name is None else merged_params(base, lora_adapters[name])
        assert out.token_ids == greedy_reference(params, prompt, 8), (name, prompt)

    first = shared + [7]
    out = llm.generate([first], adapter=["all5"], sampling=GREEDY)[0]
    expect(first, "all5", out)
    assert stats.prefix_cached_tokens == 0 and kv.cached_pages >= 4
    assert out.num_cached_tokens == 0
    # The same prefix: 16 tokens (4 pages) from the cache for the same adapter only.
    prompts = [shared + [8, 9], shared[:17], shared + [1], shared[:10] + [4] * 9]
    names = ["all5", "all5", None, "qv1"]
    outs = llm.generate(prompts, adapter=names, sampling=GREEDY)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        expect(prompt, name, out)
    assert stats.prefix_cached_tokens == 16 + 16
    # Each request's own count (vLLM's num_cached_tokens; the server's cached_tokens).
    assert [out.num_cached_tokens for out in outs] == [16, 16, 0, 0]
    assert kv.free_pages == config.kv.num_pages
    # A prompt that is all cached pages still computes its last token (for its logits).
    again = llm.generate([shared[:16]], adapter=["all5"], sampling=GREEDY)[0]
    expect(shared[:16], "all5", again)
    assert stats.prefix_cached_tokens == 32 + 12 and again.num_cached_tokens == 12
    # Reset (vLLM's reset_prefix_cache): nothing cached, the same prompt computes it all.
    registered = kv.cached_pages
    assert registered >= 4 and llm.reset_prefix_cache() == registered
    assert kv.cached_pages == 0 and kv.free_pages == config.kv.num_pages
    expect(shared[:16], "all5", llm.generate([shared[:16]], adapter=["all5"], sampling=GREEDY)[0])
    assert stats.prefix_cached_tokens == 32 + 12 and kv.cached_pages >= 4
    # Under preemption (a pool of 13 pages), several requests of two adapters at once.
    small = dataclasses.replace(config, kv=dataclasses.replace(config.kv, num_pages=13))
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=small, load_workers=0
    )
    prompts = [shared + [i] for i in range(5)]
    names = ["mlp16", "mlp16", None, "mlp16", None]
    outs = llm.generate(prompts, adapter=names, sampling=GREEDY)
    assert llm.engine.stats.preemptions > 0 and llm.engine.stats.prefix_cached_tokens > 0
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        expect(prompt, name, out)
    assert llm.engine.kv.free_pages == 13


def test_stale_nan_in_the_kv_pools_reaches_no_request(base, lora_adapters):
    """Every KV slot starts as NaN, as the slots a request whose activations overflowed leave
    behind for the next holder of its pages: prompts of 3 to 17 tokens (ragged last pages, up
    to three prefill chunks of 8) and their decode steps still give the full recompute's
    tokens."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(num_pages=40),
        load_workers=0,
    )
    kv = llm.engine.kv
    kv.k_pool, kv.v_pool = (jnp.full_like(pool, jnp.nan) for pool in (kv.k_pool, kv.v_pool))
    prompts = [[5, 6, 7], list(range(3, 13)), [9] * 6, list(range(20, 37))]
    names = ["all5", None, "qv1", "mlp16"]
    outs = llm.generate(prompts, adapter=names, sampling=GREEDY)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        params = base if name is None else merged_params(base, lora_adapters[name])
        assert out.token_ids == greedy_reference(params, prompt, 8), (name, prompt)


def test_a_request_whose_logits_overflow_ends_in_an_error_alone(base, lora_adapters):
    """An adapter of finite but absurd weights (every B value 3e38, float32's largest) drives
    its rows' activations past float32 and their logits to NaN: its requests end in an error
    naming it at its first token (not an argmax over NaN passed off as tokens), and the
    requests beside them in the same steps, and after them on the same pages, give the full
    recompute's tokens."""
    import dataclasses

    absurd = dataclasses.replace(
        lora_adapters["all5"],
        name="absurd",
        b={m: np.full_like(b, 3e38) for m, b in lora_adapters["all5"].b.items()},
    )
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters={**lora_adapters, "absurd": absurd},
        engine_config=small_engine_config(num_pages=40),
        load_workers=0,
    )
    prompts = [[5, 6, 7, 8, 9], list(range(3, 13)), [9] * 6]
    names = ["absurd", "all5", None]
    outs = llm.generate(prompts, adapter=names, sampling=GREEDY)
    assert outs[0].finish_reason == str(FinishReason.ERROR) and outs[0].token_ids == []
    assert outs[0].error == (
        "the model's logits at output token 0 are not finite (NaN or inf): the activations of "
        "adapter 'absurd' overflowed on this prompt"
    )
    for prompt, name, out in zip(prompts[1:], names[1:], outs[1:], strict=True):
        assert out.token_ids == greedy_reference(
            base if name is None else merged_params(base, lora_adapters[name]), prompt, 8
        ), name
    again = llm.generate([[5, 6, 7, 8]], adapter=["all5"], sampling=GREEDY)[0]
    assert again.token_ids == greedy_reference(
        merged_params(base, lora_adapters["all5"]), [5, 6, 7, 8], 8
    )
    assert llm.engine.kv.free_pages == 40


def test_fp8_kv_cache_stays_close_to_the_auto_engine(base, lora_adapters):
    """KVCacheConfig.cache_dtype: pools of the fp8 format named, a quarter of float32's bytes a
    page. Outputs are no longer the auto engine's bit for bit, but close. Over the prompts and
    the fp8 engine's greedy tokens, both engines' prompt logprobs (each chunk reads its K/V
    back from the cache) agree within a tolerance, and so do the fp8 engine's logprobs of its
    tokens (decode steps) and the auto engine's of the same tokens; each token is within twice
    the tolerance of the auto engine's best there (greedy over logits moved by less than it).
    The kernels (interpret mode, RoPE and the writes in one launch) give the reference path's
    tokens."""
    import dataclasses

    def engine(cache_dtype, impl="reference", kv_write="xla"):
        config = small_engine_config(cache_dtype=cache_dtype)
        runner = dataclasses.replace(config.runner, impl=impl, kv_write=kv_write)
        return jaxlora.LLM(
            TINY,
            params=base,
            adapters=lora_adapters,
            engine_config=dataclasses.replace(config, runner=runner),
            load_workers=0,
        )

    auto = engine("auto")
    for cache_dtype, fp8 in (
        ("fp8", jnp.float8_e4m3fn),
        ("fp8_e4m3", jnp.float8_e4m3fn),
        ("fp8_e5m2", jnp.float8_e5m2),
    ):
        kv = engine(cache_dtype).engine.kv
        assert kv.k_pool.dtype == kv.v_pool.dtype == fp8, cache_dtype
        assert 4 * kv.bytes_per_page == auto.engine.kv.bytes_per_page
    assert auto.engine.kv.k_pool.dtype == jnp.float32
    rng = np.random.default_rng(12)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (19, 5, 1, 12)]
    names = [None, "all5", None, "qv1"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    tolerance = 0.05  # e4m3's 3 mantissa bits moved these logprobs by about 0.01
    llm = engine("fp8")
    outs = llm.generate(prompts, adapter=names, sampling=greedy)
    sequences = [p + o.token_ids for p, o in zip(prompts, outs, strict=True)]
    want = auto.generate(sequences, adapter=names, sampling=score)
    got = llm.generate(sequences, adapter=names, sampling=score)
    largest_difference = 0.0
    for prompt, out, w, g in zip(prompts, outs, want, got, strict=True):
        np.testing.assert_allclose(g.prompt_logprobs[1:], w.prompt_logprobs[1:], atol=tolerance)
        generated = w.prompt_logprobs[len(prompt) :]
        np.testing.assert_allclose(out.logprobs, generated, atol=tolerance)
        best = [max(top.values()) for top in w.prompt_top_logprobs[len(prompt) :]]
        assert (np.asarray(generated) >= np.asarray(best) - 2 * tolerance).all()
        largest_difference = max(
            largest_difference,
            np.abs(np.subtract(g.prompt_logprobs[1:], w.prompt_logprobs[1:])).max(),
        )
    assert largest_difference > 0, "the fp8 cache changed no logprob: is it in use?"
    # (the requests without adapter: the kernels' LoRA paths are slow in interpret mode)
    kernels = engine("fp8", impl="pallas_interpret", kv_write="pallas")
    base_only = [0, 2]
    on_kernels = kernels.generate([prompts[i] for i in base_only], sampling=greedy)
    assert [o.token_ids for o in on_kernels] == [outs[i].token_ids for i in base_only]


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("num_pages", [96, 20])
def test_choices_of_one_prompt_compute_its_pages_once(
    base, lora_adapters, async_scheduling, num_pages
):
    """Four sampled choices of each of two 14-token prompts (one with an adapter; prefill
    chunks of 8): the first computes the prompt, the others wait for its 3 full pages and
    compute only the last 2 tokens; each choice's tokens are those it gets alone, async and
    synchronous, and with preemptions (a pool of 20 pages); pages all return."""
    import dataclasses

    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(3, 500, 14))) for _ in range(2)]
    names = ["all5", None]
    config = dataclasses.replace(
        small_engine_config(num_pages=num_pages, max_model_len=32),
        async_scheduling=async_scheduling,
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )

    def sampling(seed):
        return SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=seed)

    alone = [
        llm.generate([prompt], adapter=[name], sampling=[sampling(seed)])[0].token_ids
        for prompt, name in zip(prompts, names, strict=True)
        for seed in range(4)
    ]
    stats = llm.engine.stats
    computed, shared = stats.prompt_tokens, stats.shared_prompt_tokens
    assert shared == 0
    outs = llm.generate(
        [prompt for prompt in prompts for _ in range(4)],
        adapter=[name for name in names for _ in range(4)],
        sampling=[sampling(seed) for _ in prompts for seed in range(4)],
    )
    assert [out.token_ids for out in outs] == alone
    if num_pages == 96:
        assert stats.preemptions == 0
        assert stats.shared_prompt_tokens == 2 * 3 * 12
        assert stats.prompt_tokens - computed == 2 * (14 + 3 * 2)
    else:
        assert stats.preemptions > 0 and stats.shared_prompt_tokens > 0
    assert llm.engine.kv.free_pages == num_pages


@pytest.mark.parametrize(("window", "busy", "shared"), [(6, True, 0), (12, False, 12)])
def test_a_later_choice_shares_no_page_its_leader_released_before_its_window(window, busy, shared):
    """A sliding window, a 14-token prompt (pages of 4), two choices in a batch of 2 rows.
    With a third request ahead of them the follower waits for its row while the leader decodes
    on and releases its pages before its own window: a window of 6 keys from the follower's
    first query (position 12) reads page 1, released, so nothing is shared (those keys read as
    page 0, another sequence's, before). Admitted at once, a follower with a window of 12 keys
    (from page 0, still held) takes the 3 full pages. Either way each choice gets the tokens
    the prompt gets alone."""
    import dataclasses

    model = dataclasses.replace(TINY, model_type="mistral", sliding_window=window)
    params = init_params(model, 0)
    config = small_engine_config()
    config = dataclasses.replace(config, runner=dataclasses.replace(config.runner, max_batch=2))
    prompt = list(range(3, 17))
    sampling = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = jaxlora.LLM(model, params=params, engine_config=config, load_workers=0)
    engine = llm.engine
    if busy:
        engine.submit(list(range(100, 110)), SamplingParams(max_tokens=8, ignore_eos=True))
    leader = engine.submit(prompt, sampling)
    follower = engine.submit(prompt, sampling, share_prompt_with=leader)
    engine.run_until_idle()
    assert engine.stats.shared_prompt_tokens == shared
    alone = llm.generate([prompt], sampling=sampling)[0].token_ids
    assert leader.output_ids == follower.output_ids == alone
    assert engine.kv.free_pages == config.kv.num_pages


def test_a_choice_asking_for_prompt_logprobs_computes_its_prompt_at_once(base):
    """A later choice that asks for prompt logprobs shares no pages (it computes every prompt
    position's logits), so it does not wait for its leader's prefill: both prefill in the
    first iteration."""
    llm = jaxlora.LLM(TINY, params=base, engine_config=small_engine_config(), load_workers=0)
    prompt = list(range(3, 17))
    leader = llm.engine.submit(prompt, GREEDY)
    follower = llm.engine.submit(
        prompt, dataclasses_replace(GREEDY, prompt_logprobs=0), share_prompt_with=leader
    )
    llm.engine.step()
    assert leader.num_computed == follower.num_computed == 8  # (chunks of 8)
    llm.engine.run_until_idle()
    assert llm.engine.stats.shared_prompt_tokens == 0
    assert follower.output_ids == leader.output_ids


def test_a_failed_step_fails_the_running_requests_and_the_engine_serves_on(base, lora_adapters):
    """The engine thread survives an exception in a step taken while earlier steps' tokens are
    still on the device (async scheduling): the running requests end with an error and free
    their pages and adapters, the pending steps are dropped, and a request submitted after
    gets the reference tokens."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    engine, run = llm.engine, llm.engine.runner.run
    assert engine.async_scheduling
    free_kv = engine.kv.free_pages
    calls = []

    def failing(mode, *args, **kwargs):
        calls.append(mode)
        if len(calls) == 4:  # a decode step, with the previous one's tokens not read yet
            raise RuntimeError("injected device failure")
        return run(mode, *args, **kwargs)

    engine.runner.run = failing
    hit = [llm.submit([5, 6, 7], adapter=a, sampling=GREEDY) for a in ("all5", None)]
    engine.start()
    try:
        assert all(r.wait(timeout=60) for r in hit)
        assert [(r.finish_reason, r.error) for r in hit] == [
            (FinishReason.ERROR, "internal error in the step")
        ] * 2
        assert engine.kv.free_pages == free_kv and llm.adapters.stats().referenced == 0
        after = llm.submit([9, 10, 11], adapter="qv1", sampling=GREEDY)
        assert after.wait(timeout=60) and after.finish_reason is FinishReason.LENGTH
    finally:
        engine.stop()
    assert calls[3] == "decode"
    assert after.output_ids == greedy_reference(
        merged_params(base, lora_adapters["qv1"]), [9, 10, 11], 8
    )


@pytest.mark.parametrize("deterministic", [False, True])
def test_runner_sgmv_config_reaches_the_kernels(base, lora_adapters, deterministic):
    """RunnerConfig.sgmv reaches the kernels and the metadata: with every LoRA launch in the
    prefill (tensor-core tile) regime, decode steps included, and every shrink split 2 ways
    along its input width (atomic adds, or with RunnerConfig.deterministic partials summed in one
    order), the Pallas engine (interpret mode) gives each adapter's greedy reference tokens.
    (tests/test_engine_gpu.py counts the regimes' kernels in the steps lowered for the GPU.)"""
    import dataclasses

    from pallas_kernels.sgmv import SgmvConfig

    config = small_engine_config()
    config = dataclasses.replace(
        config,
        runner=dataclasses.replace(
            config.runner,
            impl="pallas_interpret",
            sgmv=SgmvConfig(
                decode_max_tokens=0,
                decode_shrink_max_tokens=0,
                shrink_block_tokens=16,
                expand_block_tokens=16,
                shrink_block_k=16,  # K steps of 16: every group's shrink can split
                shrink_split_k=2,
                target_programs=10_000,
            ),
            deterministic=deterministic,
        ),
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44], [300]]
    names = ["all5", "mlp16", "qv1"]
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(prompts, adapter=names, sampling=sampling)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        expected = greedy_reference(merged_params(base, lora_adapters[name]), prompt, 4)
        assert out.token_ids == expected, name


def test_decode_steps_of_distinct_adapters_run_per_token(base, lora_adapters):
    """A decode step whose adapters have about one token each runs the SGMV kernels per token
    (choose_per_token, on the host, per step; a static flag of the compiled step), and gives
    each adapter's greedy reference tokens; steps above ``per_token_max_rows`` keep the tiles,
    and per_token_max_rows=None never runs per token. Decode steps here would otherwise take the
    prefill tiles (decode_max_tokens=0), so the choice changes the kernels."""
    import dataclasses

    from pallas_kernels.sgmv import SgmvConfig

    def engine_with(warmup=False, **sgmv):
        config = dataclasses.replace(small_engine_config(), warmup=warmup)
        runner = dataclasses.replace(
            config.runner,
            impl="pallas_interpret",
            sgmv=SgmvConfig(decode_max_tokens=0, decode_shrink_max_tokens=0, **sgmv),
        )
        config = dataclasses.replace(config, runner=runner)
        return jaxlora.LLM(
            TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
        )

    def per_token_shapes(llm):
        return {key for key in llm.engine.runner.compiled_shapes if key[5]}  # per token

    sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44], [300]]
    llm = engine_with(warmup=True)
    engine = llm.engine
    warmed = set(engine.runner.compiled_shapes)  # warm-up compiles the per-token step too
    pages = engine.engine_config.kv.max_pages_per_seq
    assert ("decode", (8, 1), pages, True, False, True, False) in warmed
    # What the flag changes in the step: the launches' kernels.
    batch = empty_batch(8, 1, engine.engine_config.kv.max_pages_per_seq)
    meta = engine._lora_meta([], np.asarray(batch.token_slot), mode="decode")
    assert "per_token" not in meta  # no token has an adapter
    step = functools.partial(engine.runner._forward, mode="decode", use_lora=True)
    jaxprs = {}
    for per_token in (False, True):
        with engine._locked_lora_pools() as pools:
            args = (engine.kv.k_pool, engine.kv.v_pool, pools, batch)
            flagged = {**meta, "per_token": True} if per_token else meta
            traced = jax.make_jaxpr(functools.partial(step, lora_meta=flagged))
            jaxprs[per_token] = str(traced(engine.runner.params, *args))
    assert "sgmv_shrink_per_token" in jaxprs[True] and "sgmv_shrink_prefill" not in jaxprs[True]
    assert "sgmv_shrink_prefill" in jaxprs[False] and "per_token" not in jaxprs[False]

    # Three adapters, one token each a decode step (rank x 1 <= 32): per token.
    names = ["all5", "mlp16", "qv1"]
    outs = llm.generate(prompts, adapter=names, sampling=sampling)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        expected = greedy_reference(merged_params(base, lora_adapters[name]), prompt, 3)
        assert out.token_ids == expected, name
    assert {key[0] for key in per_token_shapes(llm)} == {"decode"}
    assert engine.runner.compiled_shapes == warmed

    # A rank-16 adapter's steps are above a limit of 8 rank rows (16 for each of its tokens):
    # the tiles.
    llm = engine_with(per_token_max_rows=8)
    outs = llm.generate(prompts, adapter="mlp16", sampling=sampling)
    merged = merged_params(base, lora_adapters["mlp16"])
    assert [o.token_ids for o in outs] == [greedy_reference(merged, p, 3) for p in prompts]
    assert not per_token_shapes(llm)

    llm = engine_with(per_token_max_rows=None)
    llm.generate(prompts, adapter=names, sampling=sampling)
    assert not per_token_shapes(llm)
    assert not llm.engine._per_token_can_apply("decode", 8)


def test_runner_xla_options_reach_the_step_and_bad_ones_fail_at_build(
    base, lora_adapters, monkeypatch
):
    """RunnerConfig.xla_options are the model step's compiler options (one engine's, not the
    process's XLA_FLAGS); the engine still gives the reference tokens; an unknown option or a
    bad value fails when the engine is built, naming the field."""
    import dataclasses

    from jaxlora.engine.runner import xla_options_from_json

    seen = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        seen.append((getattr(fn, "__name__", None), kwargs.get("compiler_options")))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    options = xla_options_from_json('{"xla_gpu_enable_triton_gemm": false}', where="test")
    assert options == (("xla_gpu_enable_triton_gemm", False),)
    config = small_engine_config()
    config = dataclasses.replace(
        config, runner=dataclasses.replace(config.runner, xla_options=options)
    )
    llm = jaxlora.LLM(
        TINY, params=base, adapters=lora_adapters, engine_config=config, load_workers=0
    )
    assert ("_packed_forward", {"xla_gpu_enable_triton_gemm": False}) in seen
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.generate([[5, 6, 7]], adapter=["mlp16"], sampling=sampling)[0]
    assert out.token_ids == greedy_reference(
        merged_params(base, lora_adapters["mlp16"]), [5, 6, 7], 4
    )
    for bad, message in (
        ({"xla_no_such_option": 1}, "No such compile option"),
        ({"xla_gpu_enable_triton_gemm": "maybe"}, "not a valid bool"),
    ):
        runner = dataclasses.replace(config.runner, xla_options=bad)
        with pytest.raises(ConfigError, match=f"runner config field xla_options .*{message}"):
            jaxlora.LLM(
                TINY,
                params=base,
                adapters=lora_adapters,
                engine_config=dataclasses.replace(config, runner=runner),
                load_workers=0,
            )
    for text, message in (
        ("{bad", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"gpu_x": 1}', "'xla_...' option name"),
    ):
        with pytest.raises(ConfigError, match=f"--xla_options: .*{message}"):
            xla_options_from_json(text, where="--xla_options")


def test_runner_xla_gemms_picks_cublas_on_the_compiled_kernels_only():
    """RunnerConfig.xla_gemms: "auto" turns XLA's Triton GEMM fusions off (cuBLAS, which reads a
    layer's slice of the stacked weights in place) with the compiled Pallas impl only; an
    explicit xla_options entry wins; a bad value names the field."""
    from jaxlora.engine.runner import RunnerConfig

    cublas = {"xla_gpu_enable_triton_gemm": False}
    assert RunnerConfig().compiler_options_for("pallas") == cublas
    assert RunnerConfig().compiler_options_for("pallas_interpret") == {}
    assert RunnerConfig().compiler_options_for("reference") == {}
    assert RunnerConfig(xla_gemms="cublas").compiler_options_for("reference") == cublas
    assert RunnerConfig(xla_gemms="autotuned").compiler_options_for("pallas") == {}
    explicit = RunnerConfig(xla_options=(("xla_gpu_enable_triton_gemm", True),))
    assert explicit.compiler_options_for("pallas") == {"xla_gpu_enable_triton_gemm": True}
    other = RunnerConfig(xla_options=(("xla_gpu_autotune_level", 0),))
    assert other.compiler_options_for("pallas") == {**cublas, "xla_gpu_autotune_level": 0}
    with pytest.raises(ConfigError, match="runner config field xla_gemms: expected 'auto', "):
        RunnerConfig(xla_gemms="cutlass")


def _decode_step_of_tiny(base, adapters, names, engine_config):
    """A TINY engine's decode step of 8 tokens, one per row, cycling over no adapter and the
    named adapters (acquired: their slots): (engine, runner, handles, batch)."""
    from jaxlora.engine.runner import empty_batch

    llm = jaxlora.LLM(
        TINY, params=base, adapters=adapters, engine_config=engine_config, load_workers=0
    )
    engine = llm.engine
    handles = [engine.adapters.acquire(n) for n in names]
    for h in handles:
        h.wait()
    batch = empty_batch(8, 1, engine_config.kv.max_pages_per_seq)
    batch = batch.replace(
        tokens=np.arange(8, dtype=np.int32).reshape(8, 1) + 3,
        token_valid=np.ones((8, 1), bool),
        seq_lens=np.ones(8, np.int32),
        token_slot=(np.arange(8) % (len(names) + 1) - 1).astype(np.int32)[:, None],
    )
    return engine, engine.runner, handles, batch


@pytest.fixture(scope="module")
def xla_decode_runs():
    """(use_lora, layer loop) -> (logits, pallas calls) of the XLA projections' decode step,
    which every lora_matmul variant below is compared against: run once per key and module."""
    return {}


@pytest.mark.parametrize(
    ("use_lora", "split", "shrink", "residual_norm", "norm_shrink"),
    # (K split alone is in every split case below; a plain no-LoRA step is the no-LoRA split
    # case's without the split, and lora_matmul's own tests run both)
    [
        (True, False, False, False, None),
        (True, True, True, False, None),
        (False, True, False, True, None),
        (True, True, False, True, None),
        (True, False, True, True, None),
        # (each opt-in shrink fusion alone in the unrolled loop, all three in the scan)
        (True, True, False, True, "unrolled:norm"),
        (True, True, False, True, "unrolled:swiglu"),
        (True, True, False, False, "unrolled:attention"),
        (True, False, False, True, "scan:norm+swiglu+attention"),
    ],
)
def test_decode_projections_through_lora_matmul_give_the_xla_logits(
    base, lora_adapters, xla_decode_runs, use_lora, split, shrink, residual_norm, norm_shrink
):
    """RunnerConfig.projection_kernel="pallas": a decode step runs every projection group through
    lora_matmul (one launch per group for the base GEMM and the LoRA expand, the weights read in
    place from the stacked kernels) and gives the logits of XLA's GEMMs + SGMV delta; prefill
    steps keep XLA's GEMMs. ``split``: K steps of 16, so every group splits K over 4 programs
    (8 for down's K = 128; the default min_programs) whose float32 partials the model sums.
    ``shrink``: the decode step's metadata lists its two adapters' rank rows, so lora_matmul
    runs the shrink too: one launch per group and layer, no SGMV launch. ``residual_norm``
    (RunnerConfig.residual_norm="pallas"): o's and down's partials go unsummed into
    pallas_kernels.residual_norm, which adds them to the residual stream and normalizes it
    (two launches a layer), with the same logits. ``norm_shrink`` (RunnerConfig.norm_shrink,
    with the layer loop named): those launches also run the q|k|v and gate|up shrinks
    (pallas_kernels.residual_norm.residual_rms_norm_shrink), the first layer's q|k|v shrink
    runs before the loop, and only o's and down's shrinks keep an SGMV launch; with "swiglu"
    (RunnerConfig.swiglu_shrink) SwiGLU and down's shrink run in one launch
    (pallas_kernels.swiglu.swiglu_shrink); with "attention" (RunnerConfig.attention_shrink)
    o's shrink runs in the decode attention launch (with all three, no layer runs an SGMV
    launch)."""
    import dataclasses

    from pallas_kernels.lora_matmul import MatmulConfig

    loop, fused = norm_shrink.split(":") if norm_shrink else (None, "")
    fused = set(fused.split("+")) - {""}
    layer_loop = loop or ("unrolled" if use_lora else "scan")
    logits, texts = {}, {}
    for projection in ("xla", "pallas"):
        if projection == "xla" and (use_lora, layer_loop) in xla_decode_runs:
            logits["xla"], texts["xla", "decode"] = xla_decode_runs[use_lora, layer_loop]
            continue
        config = small_engine_config()
        # The XLA side is the plain step (XLA's GEMMs + the SGMV delta) that every lora_matmul
        # variant must match; the kernels' knobs are the Pallas side's only.
        knobs = dict(
            matmul=MatmulConfig(block_k=16 if split else None, shrink_rows=32 if shrink else 0),
            residual_norm="pallas" if residual_norm else "xla",
            norm_shrink="norm" in fused,
            swiglu_shrink="swiglu" in fused,
            attention_shrink="attention" in fused,
            fused_shrink_rows=4,
        )
        runner_config = dataclasses.replace(
            config.runner,
            impl="pallas_interpret",
            projection_kernel=projection,
            layer_loop=layer_loop,
            **(knobs if projection == "pallas" else {}),
        )
        engine, runner, handles, batch = _decode_step_of_tiny(
            base, lora_adapters, ("all5", "qv1"), dataclasses.replace(config, runner=runner_config)
        )
        meta = engine._lora_meta(
            [h.slot_info for h in handles], batch.token_slot, mode="decode" if shrink else None
        )
        assert ("shrink_rows" in meta) == (shrink and projection == "pallas")
        if shrink and projection == "pallas":
            # The same rows in a step of more tokens than shrink_max_tokens: the SGMV shrink.
            limit = runner_config.matmul.shrink_max_tokens
            assert runner.shrink_rows("decode", limit, meta["ranks"], 2) is not None
            assert runner.shrink_rows("decode", limit + 1, meta["ranks"], 2) is None
        forward = jax.jit(runner._forward, static_argnames=("mode", "use_lora"))
        with engine._locked_lora_pools() as pools:
            args = (runner.params, engine.kv.k_pool, engine.kv.v_pool, pools, batch, meta)
            for mode in ("decode", "prefill") if projection == "pallas" else ("decode",):
                texts[projection, mode] = _pallas_calls(
                    jax.make_jaxpr(
                        functools.partial(runner._forward, mode=mode, use_lora=use_lora)
                    )(*args).jaxpr
                )
            logits[projection] = np.asarray(forward(*args, mode="decode", use_lora=use_lora)[0])
            if projection == "xla":
                xla_decode_runs[use_lora, layer_loop] = logits["xla"], texts["xla", "decode"]
            if projection == "pallas" and runner_config.layer_loop == "scan":
                # Inside the layer scan XLA copies a dynamic slice of each weight before its dot;
                # lora_matmul reads the stacked kernels in place: no weight-sized slice is left.
                hlo = forward.lower(*args, mode="decode", use_lora=use_lora).compile().as_text()
                assert max(_dynamic_slice_sizes(hlo)) < 64 * 64
        for h in handles:
            h.release()
    matmuls = [(n, shapes) for n, shapes in texts["pallas", "decode"] if "lora_matmul" in n]
    # One launch per group and layer (scan: one traced layer), the LoRA expand fused with LoRA;
    # every launch reads the whole layer-stacked kernel (no per-layer slice or copy before it).
    layers = TINY.num_layers if runner_config.layer_loop == "unrolled" else 1  # traced layers
    assert len(matmuls) == 4 * layers
    assert all(("_expand_" in n) == (use_lora and not shrink) for n, _ in matmuls)
    assert all(("_shrink32_" in n) == shrink for n, _ in matmuls)
    sgmv = [n for n, _ in texts["pallas", "decode"] if n.startswith("sgmv_")]
    if fused:  # each group's shrink a layer where nothing fuses it
        in_sgmv = 4 - 2 * ("norm" in fused) - ("swiglu" in fused) - ("attention" in fused)
        assert len(sgmv) == in_sgmv * layers + ("norm" in fused)  # + the first q|k|v shrink
    else:
        assert len(sgmv) == (4 * layers if use_lora and not shrink else 0)
    attentions = [n for n, _ in texts["pallas", "decode"] if n.startswith("paged_attention_")]
    assert len(attentions) == layers
    assert all(n.endswith("_shrink") == ("attention" in fused) for n in attentions)
    swiglus = [n for n, _ in texts["pallas", "decode"] if n.startswith("swiglu_shrink_")]
    assert len(swiglus) == (layers if "swiglu" in fused else 0)
    assert all("_rows4_" in n for n in swiglus)
    assert all(bool(re.search(r"_sk[48]_", n)) == split for n, _ in matmuls)
    assert all(shapes[1][0] == TINY.num_layers and len(shapes[1]) == 3 for _, shapes in matmuls)
    for key in (("pallas", "prefill"), ("xla", "decode")):
        assert not any("lora_matmul" in n for n, _ in texts[key])
        assert not any("residual_rms_norm" in n for n, _ in texts[key])
    norms = [(n, shapes) for n, shapes in texts["pallas", "decode"] if "residual_rms_norm" in n]
    assert len(norms) == (2 * layers if residual_norm else 0)
    # Each reads its projection's partials (4 or 8 parts with the split, 1 without) and the
    # layer-stacked norm scales in place.
    parts = {shapes[2][0] for _, shapes in norms}
    assert parts <= ({4, 8} if split else {1})
    assert all(shapes[3] == (TINY.num_layers, TINY.hidden_size) for _, shapes in norms)
    assert all(n.endswith("_w16") for n, _ in norms)  # RunnerConfig.residual_norm_warps
    fused_norms = [n for n, _ in norms if n.startswith("residual_rms_norm_shrink_")]
    assert len(fused_norms) == (len(norms) if "norm" in fused else 0)
    assert all("_rows4_" in n for n in fused_norms)  # RunnerConfig.fused_shrink_rows
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_write", ["pallas", "xla"])
def test_lora_update_in_place_gives_the_delta_forms_logits(base, lora_adapters, kv_write):
    """RunnerConfig.lora_update: where XLA's GEMMs compute a step's projections (prefill; here
    decode too, projection_kernel="xla"), "in_place" has the SGMV expand update each group's
    one output (the fused q|k|v with the RoPE kernel, gate|up, o, down) in place, "delta" has
    it write a float32 delta that XLA adds. The same arithmetic: the same logits, bit for bit,
    in both modes, three adapters' tokens and base tokens in one batch. With the XLA K/V write
    q|k|v stays split into three outputs, which take the delta."""
    import dataclasses

    logits, expands = {}, {}
    for update in ("in_place", "delta"):
        config = small_engine_config()
        runner_config = dataclasses.replace(
            config.runner,
            impl="pallas_interpret",
            projection_kernel="xla",
            kv_write=kv_write,
            lora_update=update,
        )
        engine, runner, handles, batch = _decode_step_of_tiny(
            base,
            lora_adapters,
            ("all5", "qv1", "mlp16"),
            dataclasses.replace(config, runner=runner_config),
        )
        meta = engine._lora_meta([h.slot_info for h in handles], batch.token_slot)
        with engine._locked_lora_pools() as pools:
            args = (runner.params, engine.kv.k_pool, engine.kv.v_pool, pools, batch, meta)
            step = functools.partial(runner._forward, mode="decode", use_lora=True)
            expands[update] = [
                aliased
                for name, aliased in _pallas_aliases(jax.make_jaxpr(step)(*args).jaxpr)
                if name.startswith("sgmv_expand")
            ]
            logits[update] = np.asarray(jax.jit(step)(*args)[0])
        for h in handles:
            h.release()
    layers = TINY.num_layers if runner_config.layer_loop == "unrolled" else 1  # traced layers
    assert len(expands["delta"]) == 4 * layers and not any(expands["delta"])
    # Each group's expand writes into its output; q|k|v split in three keeps the delta.
    assert len(expands["in_place"]) == 4 * layers
    assert sum(expands["in_place"]) == (4 if kv_write == "pallas" else 3) * layers
    assert np.abs(logits["delta"]).max() > 0
    np.testing.assert_array_equal(logits["in_place"], logits["delta"])


def _pallas_call_eqns(jaxpr):
    """Every pallas_call equation of a jaxpr, sub-jaxprs (scan, jit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _pallas_call_eqns(inner)


def _pallas_aliases(jaxpr) -> list[tuple[str, bool]]:
    """(name, whether it updates an input in place) of every pallas_call in a jaxpr."""
    return [
        (str(eqn.params.get("name")), bool(eqn.params["input_output_aliases"]))
        for eqn in _pallas_call_eqns(jaxpr)
    ]


def _pallas_calls(jaxpr) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(name, operand shapes) of every pallas_call in a jaxpr, sub-jaxprs (scan, jit) included."""
    return [
        (str(eqn.params.get("name")), [v.aval.shape for v in eqn.invars])
        for eqn in _pallas_call_eqns(jaxpr)
    ]


def _dynamic_slice_sizes(hlo: str) -> list[int]:
    """Element counts of the results of every instruction of an optimized HLO module that is or
    fuses a dynamic slice (0 when there is none)."""
    sizes = [0]
    for line in hlo.splitlines():
        if "dynamic-slice" not in line or "=" not in line:
            continue
        match = re.search(r"=\s*\w+\[([\d,]*)\]", line)
        if match:
            dims = [int(d) for d in match.group(1).split(",") if d]
            sizes.append(int(np.prod(dims)) if dims else 1)
    return sizes


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_gives_the_models_logits(tied):
    """model.lm_head (the head the prompt-logprob steps run a slice of positions at a time)
    is the model's own, with tied embeddings or an lm_head kernel."""
    import dataclasses

    from jaxlora.model import lm_head

    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    params = init_params(config, 3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    logits, hidden = Llama(config).apply({"params": params}, tokens, return_hidden=True)
    np.testing.assert_allclose(
        np.asarray(lm_head(params, config, hidden, jnp.float32)), np.asarray(logits), rtol=1e-6
    )


def test_prompt_logprobs_sliced_over_positions_are_the_whole_chunks():
    """runner.sliced_prompt_logprobs over slices of 4 positions (13 positions: the last slice
    padded) packs what pack_prompt_logprobs packs from the whole chunk's logits."""
    from jaxlora.engine.runner import pack_prompt_logprobs, sliced_prompt_logprobs

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    targets = jnp.asarray(rng.integers(-1, 40, (2, 13)), jnp.int32)
    whole = pack_prompt_logprobs(hidden @ weight, targets)
    sliced = sliced_prompt_logprobs(lambda h: h @ weight, hidden, targets, 4)
    assert sliced.shape == whole.shape
    # (words 1..21: the target's rank and the top ids)
    np.testing.assert_array_equal(np.asarray(sliced)[..., 1:22], np.asarray(whole)[..., 1:22])
    np.testing.assert_allclose(
        np.asarray(sliced).view(np.float32),
        np.asarray(whole).view(np.float32),
        rtol=1e-5,
        atol=1e-6,
    )


def test_llm_chat_renders_each_conversation_then_generates(base):
    """LLM.chat (vLLM's): one conversation or a list, rendered with the chat template (a
    prefilled answer continued), gives generate's completions of those prompt ids."""
    tokenizer = tiny_tokenizer()
    llm = jaxlora.LLM(
        TINY, params=base, tokenizer=tokenizer, engine_config=small_engine_config(), load_workers=0
    )
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    question = [{"role": "user", "content": "The cat"}]
    prefilled = [*question, {"role": "assistant", "content": "It is"}]
    [one] = llm.chat(question, sampling=greedy)
    assert one.prompt_ids == tokenizer.encode_chat(question)
    assert one.token_ids == llm.generate([one.prompt_ids], sampling=greedy)[0].token_ids
    both = llm.chat([question, prefilled], sampling=greedy, continue_final_message=True)
    ids = [tokenizer.encode_chat(c, continue_final_message=True) for c in (question, prefilled)]
    assert [c.prompt_ids for c in both] == ids
    assert tokenizer.decode(ids[1]).endswith("It is")
    assert [c.token_ids for c in both] == [c.token_ids for c in llm.generate(ids, sampling=greedy)]


def test_the_engine_serves_under_a_guard_against_implicit_transfers(base, lora_adapters):
    """A pipeline that disallows implicit host-to-device transfers (to catch its own stray
    ones) can still generate: each step's and each sampler's one packed host array is let
    through, and the same tokens come out as without the guard."""
    llm = jaxlora.LLM(
        TINY,
        params=base,
        adapters=lora_adapters,
        engine_config=small_engine_config(),
        load_workers=0,
    )
    prompts = [[5, 6, 7, 8], list(range(40, 52)), [300, 301]]
    adapters = ["all5", None, "qv1"]
    sampling = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=sampling)]
    with jax.transfer_guard_host_to_device("disallow"):
        guarded = llm.generate(prompts, adapter=adapters, sampling=sampling)
    assert [o.token_ids for o in guarded] == expected
    assert all(len(t) == 6 for t in expected)

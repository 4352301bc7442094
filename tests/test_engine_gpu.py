"""On the GPU: the engine with the Pallas kernels (SGMV + paged attention) generates the same
tokens as with the jnp reference path. On any machine: its step shapes lower for the GPU."""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
from gpu_lowering import lower_for_gpu, triton_kernels

import jaxlora
from configs.models import TINY
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.engine.runner import empty_batch
from jaxlora.lora import random_lora_weights
from jaxlora.model import init_params
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES
from pallas_kernels.lora_matmul import MatmulConfig
from pallas_kernels.paged_attention import PagedAttentionConfig
from pallas_kernels.sgmv import SgmvConfig

# Big enough for tensor-core tiles and several pages per sequence, small enough for seconds.
CONFIG = dataclasses.replace(
    TINY,
    hidden_size=256,
    intermediate_size=512,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    vocab_size=1024,
    num_layers=3,
)
# Gemma's head_dim (256) and Gemma-2B's one KV head, GELU (tanh) gating, embeddings scaled
# by sqrt(hidden) and tied to the LM head.
GEMMA = dataclasses.replace(
    CONFIG,
    model_type="gemma",
    hidden_act="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    rms_norm_eps=1e-6,
)
# Gemma 2: caps small enough to bend the scores and logits, query_pre_attn_scalar apart from
# head_dim, two KV heads; a window of 24 keys on the even layers (the prompts are longer).
GEMMA2 = dataclasses.replace(
    GEMMA,
    model_type="gemma2",
    num_kv_heads=2,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    query_pre_attn_scalar=144,
    local_window=24,
)


# Gemma 3 (text): Gemma 2's layer without the caps, q / k norms, the sliding layers' RoPE base.
GEMMA3 = dataclasses.replace(
    GEMMA2,
    model_type="gemma3_text",
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    rope_theta=1e6,
    local_rope_theta=1e4,
)


@pytest.mark.gpu
def test_pallas_engine_matches_reference_engine():
    params = init_params(CONFIG, 0)
    adapters = {
        f"a{i}": random_lora_weights(CONFIG, f"a{i}", rank, modules, seed=i, std=0.05)
        for i, (rank, modules) in enumerate(
            [(16, MODULES), (1, ("q_proj", "v_proj")), (64, MODULES), (7, MODULES[3:])]
        )
    }
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 1000, n))) for n in (1, 40, 17, 90, 5, 64)]
    names = ["a0", None, "a1", "a2", "a3", "a0"]
    # Ranks 16 and 7 (a3: MLP only): 23 rank rows, so with MatmulConfig.shrink_rows = 32 (the
    # last run; the default, the others turn it off) lora_matmul runs their decode steps'
    # shrink in its K loop.
    few = ["a0", None, "a3", "a0", None, "a3"]
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    # The third runs each decode projection group through lora_matmul (base GEMM + LoRA
    # expand); the fourth also rotates q, k and writes K/V in one Pallas launch a layer
    # (kv_write="pallas"), one layer a scan iteration (the default since the thirtieth session,
    # with XLA's cuBLAS GEMMs on this impl: RunnerConfig.xla_gemms); the
    # fifth runs the shrink of steps with few adapters inside lora_matmul; the sixth pads
    # decode steps to 64 rows, so that lora_matmul's blocks hold 64 tokens and (without the
    # few-adapters epilogue) add the delta in the pipelined rows epilogue; the seventh adds o's
    # and down's partials into the residual stream and normalizes it in
    # pallas_kernels.residual_norm (RunnerConfig.residual_norm="pallas", the default since the
    # thirty-third session); the eighth also runs the q|k|v and gate|up shrinks of its SGMV
    # decode steps in those launches (RunnerConfig.norm_shrink), down's with SwiGLU
    # (RunnerConfig.swiglu_shrink) and o's in the attention launch (RunnerConfig.attention_shrink).
    runs = (
        ("reference", "xla", "xla", 0, 8, 4, "xla"),
        ("pallas", "xla", "xla", 0, 8, 4, "xla"),
        ("pallas", "pallas", "xla", 0, 8, 4, "xla"),
        ("pallas", "pallas", "pallas", 0, 8, 4, "xla"),
        ("pallas", "pallas", "pallas", 32, 8, 4, "xla"),
        ("pallas", "pallas", "pallas", 0, 64, 0, "xla"),
        ("pallas", "pallas", "pallas", 0, 8, 4, "pallas"),
        ("pallas", "pallas", "pallas", 0, 8, 4, "pallas+shrink"),
    )
    for run in runs:
        impl, projection, kv_write, shrink_rows, decode_rows, epilogue_adapters, norm = run
        config = EngineConfig(
            kv=KVCacheConfig(page_size=16, num_pages=128, max_model_len=256),
            runner=RunnerConfig(
                max_batch=decode_rows,
                prefill_chunk=32,
                max_prefill_rows=4,
                impl=impl,
                projection_kernel=projection,
                kv_write=kv_write,
                residual_norm=norm.removesuffix("+shrink"),
                norm_shrink=norm.endswith("+shrink"),
                swiglu_shrink=norm.endswith("+shrink"),
                # and o's in the attention launch, given one kv split (the heuristic splits
                # this model's 2 kv heads x 8 rows 4 ways)
                attention_shrink=norm.endswith("+shrink"),
                paged_attention=(
                    PagedAttentionConfig(pages_per_block=4, kv_splits=1)
                    if norm.endswith("+shrink")
                    else None
                ),
                # plain_max_tokens=decode_rows: lora_matmul runs every decode step, also the 64-row
                # ones with many adapters (by default XLA's cuBLAS GEMMs run those).
                matmul=MatmulConfig(
                    shrink_rows=shrink_rows,
                    epilogue_adapters=epilogue_adapters,
                    plain_max_tokens=decode_rows,
                ),
                # One step shape per mode (padded rows): 4 compilations per engine instead of
                # 14; with the default buckets the test outran a 170 s limit on the H200.
                decode_buckets=(decode_rows,),
                prefill_buckets=(4,),
            ),
            lora_pool=LoraPoolConfig(max_rank=64, rows_per_page=16, pages_per_pool=64, max_slots=8),
            warmup=False,
        )
        llm = jaxlora.LLM(
            CONFIG, params=params, adapters=adapters, engine_config=config, load_workers=0
        )
        assert llm.engine.runner.impl == impl
        assert llm.engine.runner.model.scan_unroll is None  # per step: scan_unroll_for_step
        if decode_rows == 64:
            assert config.runner.matmul.epilogue_for(64) == "rows_prefetch"
        outputs[run] = [
            o.token_ids
            for adapters_of in (names, few)
            for o in llm.generate(prompts, adapter=adapters_of, sampling=sampling)
        ]
    assert jax.default_backend() == "gpu"
    for run in runs[1:]:
        assert outputs[run] == outputs[runs[0]], run


def default_kernels_config(impl: str, *, cache_dtype: str = "auto") -> EngineConfig:
    """An engine of ``impl`` at its default kernels, one step shape per mode (8 decode rows,
    4 prefill rows of 32 tokens), rank up to 16."""
    return EngineConfig(
        kv=KVCacheConfig(page_size=16, num_pages=128, max_model_len=256, cache_dtype=cache_dtype),
        runner=RunnerConfig(
            max_batch=8,
            prefill_chunk=32,
            max_prefill_rows=4,
            impl=impl,
            decode_buckets=(8,),
            prefill_buckets=(4,),
        ),
        lora_pool=LoraPoolConfig(max_rank=16, rows_per_page=16, pages_per_pool=64, max_slots=8),
        warmup=False,
    )


@pytest.mark.gpu
def test_pallas_engine_with_an_fp8_kv_cache_matches_its_reference_engine():
    """KVCacheConfig.cache_dtype="fp8": the compiled engine at its default kernels (RoPE and
    the K/V writes in one Pallas launch, paged attention reading the e4m3 pools, lora_matmul)
    generates the reference path's tokens over the same kind of cache."""
    params = init_params(CONFIG, 0)
    adapters = {
        f"a{i}": random_lora_weights(CONFIG, f"a{i}", rank, MODULES, seed=i, std=0.05)
        for i, rank in enumerate((16, 8))
    }
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 1000, n))) for n in (1, 40, 17, 90)]
    names = ["a0", None, "a1", "a0"]
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for impl in ("reference", "pallas"):
        config = default_kernels_config(impl, cache_dtype="fp8")
        llm = jaxlora.LLM(
            CONFIG, params=params, adapters=adapters, engine_config=config, load_workers=0
        )
        assert llm.engine.kv.k_pool.dtype == jax.numpy.float8_e4m3fn
        outputs[impl] = [
            o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sampling)
        ]
    assert jax.default_backend() == "gpu"
    assert outputs["pallas"] == outputs["reference"]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "model_type",
    ["qwen2", "qwen3", "qwen3_sliding", "mistral", "gemma", "gemma2", "gemma3_text"],
)
def test_pallas_engine_of_each_family_matches_its_reference_engine(model_type):
    """Qwen2 (q/k/v biases added to lora_matmul's and XLA's q|k|v), Qwen3 (per-head q/k
    norms before the RoPE + K/V write kernel, head_dim 64 apart from hidden / heads) and
    Mistral with a sliding window of 24 keys (the decode kernel skipping the blocks before
    it, the prefill mask; both engines release the KV pages before it): the compiled engine at
    its default kernels generates the reference path's tokens. The Qwen2 model has
    Qwen2.5-7B's proportions: 7 query heads a KV head, a hidden width of 3.5 x 128 and an
    intermediate of 18944 / 16 (ragged tiles in every kernel). Gemma: Gemma's head_dim of 256
    with one KV head (Gemma-2B's), GELU gating, scaled and tied embeddings; Gemma 2: its norms
    after attention and the MLP, soft-capped scores (in the decode kernel) and logits, a
    window on its even layers; Gemma 3: q / k norms, the sliding layers' own RoPE base;
    Qwen3 with use_sliding_window: a window of 24 keys on its layers from the second on."""
    from tests.test_model_families import random_family_params

    if model_type == "qwen2":
        config_of = dataclasses.replace(
            CONFIG,
            model_type=model_type,
            hidden_size=448,
            num_heads=7,
            num_kv_heads=1,
            head_dim=64,
            intermediate_size=1184,
        )
    elif model_type == "qwen3_sliding":
        config_of = dataclasses.replace(
            CONFIG, model_type="qwen3", head_dim=64, local_window=24, max_window_layers=1
        )
    elif model_type == "mistral":
        config_of = dataclasses.replace(CONFIG, model_type=model_type, sliding_window=24)
    elif model_type == "gemma":
        config_of = GEMMA
    elif model_type == "gemma2":
        config_of = GEMMA2
    elif model_type == "gemma3_text":
        config_of = GEMMA3
    else:
        config_of = dataclasses.replace(CONFIG, model_type=model_type, head_dim=64)
    params = random_family_params(config_of, 0)
    adapters = {
        f"a{i}": random_lora_weights(config_of, f"a{i}", rank, MODULES, seed=i, std=0.05)
        for i, rank in enumerate((16, 8))
    }
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(3, 1000, n))) for n in (1, 40, 17, 90)]
    names = ["a0", None, "a1", "a0"]
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for impl in ("reference", "pallas"):
        config = default_kernels_config(impl)
        llm = jaxlora.LLM(
            config_of, params=params, adapters=adapters, engine_config=config, load_workers=0
        )
        outputs[impl] = [
            o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sampling)
        ]
    assert jax.default_backend() == "gpu"
    assert outputs["pallas"] == outputs["reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("model", [CONFIG, GEMMA], ids=["head_dim32", "gemma_head_dim256"])
def test_cudnn_and_default_prefill_engines_give_xla_s_prompt_logprobs_in_bf16(model):
    """The compiled bf16 engine (prompts of 1-90 tokens over several 32-token chunks, three
    adapters and none, the default kernels; head_dim 32 with grouped KV heads, and Gemma's 256
    with one KV head) with RunnerConfig.prefill_attention="cudnn", and with the defaults
    ("auto": cuDNN's for the 32-wide heads, XLA's for Gemma's) and page tables cut to context
    buckets of 32 and 64 keys (prefill_context_buckets): every prompt token's logprob within
    bf16 rounding of the engine whose prefill runs XLA's attention over the whole table; and
    the first sampled tokens mostly agree (greedy, random weights: a near tie may flip)."""
    import jax.numpy as jnp

    params = init_params(model, 0, jnp.bfloat16)
    adapters = {
        f"a{i}": random_lora_weights(model, f"a{i}", rank, MODULES, seed=i, std=0.05)
        for i, rank in enumerate((16, 8, 4))
    }
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(3, 1000, n))) for n in (1, 40, 17, 90, 64, 33)]
    names = ["a0", None, "a1", "a2", "a0", None]
    sampling = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    results = {}
    for name, attention, buckets in (
        ("xla", "xla", ()),
        ("cudnn", "cudnn", ()),
        ("default", "auto", (32, 64)),
    ):
        config = default_kernels_config("pallas")
        runner = dataclasses.replace(
            config.runner, prefill_attention=attention, prefill_context_buckets=buckets
        )
        llm = jaxlora.LLM(
            model,
            params=params,
            adapters=adapters,
            engine_config=dataclasses.replace(config, runner=runner),
            dtype=jnp.bfloat16,
            load_workers=0,
        )
        try:
            results[name] = llm.generate(prompts, adapter=names, sampling=sampling)
        finally:
            llm.stop()
    assert jax.default_backend() == "gpu"
    for name in ("cudnn", "default"):
        same_first = 0
        for xla, other in zip(results["xla"], results[name], strict=True):
            expected = np.asarray(xla.prompt_logprobs[1:], np.float32)
            actual = np.asarray(other.prompt_logprobs[1:], np.float32)
            assert np.isfinite(actual).all()
            np.testing.assert_allclose(actual, expected, atol=0.1, rtol=0.02, err_msg=name)
            same_first += xla.token_ids == other.token_ids
        assert same_first >= len(prompts) - 1, name


# The KV cache of _lowered_steps' engines.
LOWERED_KV = KVCacheConfig(page_size=16, num_pages=64, max_model_len=128)


def _bucket_shapes(runner):
    """The step shapes of one of _lowered_steps' engines."""
    return runner.bucket_shapes(LOWERED_KV.max_pages_per_seq, LOWERED_KV.page_size)


def _lowered_steps(
    *, use_lora=(False, True), few_adapters=False, max_batch=4, model=CONFIG, **runner_fields
):
    """Every step shape of a small Pallas engine (``max_batch`` decode rows, 2 prefill rows; the
    other RunnerConfig fields given) lowered for an abstract GPU: (runner, a list of (mode,
    use_lora, StableHLO text)). ``few_adapters``: the LoRA metadata of a step with few adapters
    (the shrink rows where lora_matmul runs the shrink)."""
    config = EngineConfig(
        kv=LOWERED_KV,
        runner=RunnerConfig(
            max_batch=max_batch, max_prefill_rows=2, impl="pallas", **runner_fields
        ),
        lora_pool=LoraPoolConfig(max_rank=16, rows_per_page=16, pages_per_pool=32, max_slots=4),
        warmup=False,
    )
    llm = jaxlora.LLM(
        model,
        params=init_params(model, 0),
        adapters={"a0": random_lora_weights(model, "a0", 16, MODULES, seed=0)},
        engine_config=config,
        load_workers=0,
    )
    engine, runner = llm.engine, llm.engine.runner
    steps = []
    for mode, rows, length, pages in _bucket_shapes(runner):
        batch = empty_batch(rows, length, pages)
        meta = engine._lora_meta(
            [], np.asarray(batch.token_slot), mode=mode if few_adapters else None
        )
        for lora in use_lora:
            step = functools.partial(runner._forward, mode=mode, use_lora=lora)
            with engine._locked_lora_pools() as pools:
                text = lower_for_gpu(
                    step, runner.params, engine.kv.k_pool, engine.kv.v_pool, pools, batch, meta
                )
            steps.append((mode, lora, text))
    return runner, steps


def _stacked_weight_slices(text, params, *, matrices=False):
    """The leading dimensions (the layers taken) of every dynamic slice in a lowered step whose
    other dimensions are one layer of a layer-stacked weight (``matrices``: of a projection
    kernel, not a norm's scale)."""
    per_layer = {
        tuple(w.shape[1:]) for w in jax.tree.leaves(params["layers"]) if not matrices or w.ndim > 2
    }
    leading = []
    for match in re.finditer(r"stablehlo\.dynamic_slice[^\n]*-> tensor<([0-9x]+)x[a-z]+\d+>", text):
        dims = tuple(int(d) for d in match.group(1).split("x"))
        taken = next((k for k in range(1, len(dims)) if dims[k:] in per_layer), None)
        if taken is not None:
            leading.append(dims[:taken])
    return leading


@pytest.mark.parametrize(
    "layer_loop,tiles_only,projection,kv_write,residual_norm",
    [
        ("scan", False, "xla", "xla", "pallas"),
        ("unrolled", False, "xla", "xla", "pallas"),
        ("scan", True, "xla", "xla", "pallas"),
        ("scan", False, "pallas", "xla", "pallas"),
        ("unrolled", False, "pallas", "pallas", "pallas"),
        ("scan", False, "pallas", "pallas", "pallas"),
        ("scan", False, "pallas", "pallas", "xla"),
    ],
)
def test_pallas_engine_steps_lower_for_the_gpu(
    layer_loop, tiles_only, projection, kv_write, residual_norm
):
    """On any machine: every step shape of an engine on the Pallas kernels (decode and prefill,
    with and without LoRA) lowers to Triton kernels for an abstract GPU (tests/gpu_lowering.py).
    RunnerConfig.sgmv picks the kernels: with the decode regime off, decode steps run the
    tensor-core tile kernels. With projection_kernel="pallas" a decode step runs lora_matmul for
    each projection group and only the shrink of the SGMV pair; with kv_write="pallas" every
    layer of every step rotates q, k and writes K/V with one more launch; with residual_norm
    "pallas" (the default) such a decode step also adds o's and down's partials into the
    residual stream and normalizes it in two more launches a layer, and slices no norm scale.
    The unrolled loop lowers every layer's launches: two layers show it (the scan's three leave
    a remainder)."""
    sgmv = SgmvConfig(decode_max_tokens=0, decode_shrink_max_tokens=0) if tiles_only else None
    model = dataclasses.replace(CONFIG, num_layers=2) if layer_loop == "unrolled" else CONFIG
    runner, steps = _lowered_steps(
        model=model,
        prefill_chunk=32,
        layer_loop=layer_loop,
        sgmv=sgmv,
        projection_kernel=projection,
        kv_write=kv_write,
        residual_norm=residual_norm,
    )
    lowered = 0
    for mode, use_lora, text in steps:
        kernels = triton_kernels(text)
        # The scan's default unroll, per step: 2 where lora_matmul runs every projection (a
        # decode step of these 4 rows with projection "pallas"), 1 where XLA's GEMMs run.
        every_group_in_lora_matmul = projection == "pallas" and mode == "decode"
        unroll = 2 if every_group_in_lora_matmul else 1
        if layer_loop == "scan":
            if every_group_in_lora_matmul and residual_norm == "pallas":
                # No layer weight sliced at all: lora_matmul and residual_rms_norm read theirs
                # stacked at the layer index.
                assert _stacked_weight_slices(text, runner.params) == [], mode
            elif every_group_in_lora_matmul:
                # No projection kernel sliced (lora_matmul reads the stack in place); the
                # norms' scales in blocks of two layers: the unroll took.
                assert _stacked_weight_slices(text, runner.params, matrices=True) == []
                assert (1, 2) in set(_stacked_weight_slices(text, runner.params)), mode
            else:
                # One layer of each stacked weight a slice: a block of several layers (unroll
                # > 1) is what XLA on the GPU copies before its own GEMMs (thirtieth session).
                slices = set(_stacked_weight_slices(text, runner.params))
                assert slices == {(1,)}, (mode, use_lora)
        # scan: unroll traced layers and, where they do not divide the layers, the remainder's;
        # unrolled: every layer. Eight SGMV launches per layer with LoRA; decode attention in
        # every layer (JAX may lower those as one shared function).
        layers = model.num_layers
        if layer_loop == "scan" and unroll < layers:
            layers = unroll + layers % unroll
        sgmv, attention = 8 * layers * use_lora, mode == "decode"
        if projection == "pallas" and mode == "decode":
            # shrink + lora_matmul (base GEMM and expand) per group instead of shrink + expand
            sgmv = 4 * layers * (1 + use_lora)
            # Base only: lora_matmul[_skN]_bm..., N parts along K where the split runs.
            base_only = re.findall(r"lora_matmul(?:_sk\d+)?_bm", text)
            assert (text.count("lora_matmul_expand") if use_lora else len(base_only)) >= 4
        norms = len(re.findall(r'name = "residual_rms_norm', text))
        if projection == "pallas" and mode == "decode" and residual_norm == "pallas":
            sgmv += 2 * layers  # not SGMV: the residual adds and norms after o and down
            assert norms >= 2 * layers
        else:
            assert norms == 0
        if kv_write == "pallas":
            sgmv += layers  # not SGMV: RoPE and the K/V write of each layer
            assert text.count("rope_write_kv_q") >= layers
            # It reads the q|k|v projection's output as it is, XLA's GEMM included (no split
            # and concatenate again: a copy a layer).
            qkv_width = CONFIG.q_size + 2 * CONFIG.kv_size
            assert not re.findall(rf"stablehlo\.concatenate[^\n]*x{qkv_width}x[a-z]+\d+>", text)
        assert sgmv + attention <= kernels <= sgmv + layers * attention, (mode, use_lora)
        if use_lora:
            per_token = "sgmv_shrink_decode" in text or "sgmv_expand_decode" in text
            if tiles_only:
                assert not per_token, mode
            elif mode == "decode":
                assert per_token
        lowered += 1
    assert lowered == 2 * len(_bucket_shapes(runner))


def test_gemma2_steps_lower_for_the_gpu():
    """On any machine: every step shape of a Gemma 2 engine (head_dim 256) on the default
    Pallas kernels lowers to Triton kernels for an abstract GPU: the RoPE + K/V write and the
    decode attention at 256 lanes a head, its scores capped and its window the traced layer's
    (the launch's name says so), lora_matmul on the decode projections (q|k|v 4 x 256 + 2 x 256
    wide over a hidden of 256), with and without LoRA; in its decode steps the residual-norm
    launches normalize o's and down's outputs before the adds (Gemma 2's sandwich norms)."""
    runner, steps = _lowered_steps(
        model=GEMMA2, prefill_chunk=32, projection_kernel="pallas", kv_write="pallas"
    )
    assert runner.config.head_dim == 256
    for mode, use_lora, text in steps:
        assert triton_kernels(text) > 0, (mode, use_lora)
        assert text.count("rope_write_kv_q") >= 1, mode
        if mode == "decode":
            assert "paged_attention" in text and "_softcap5_layer_window" in text
            assert re.findall(r"lora_matmul", text), (mode, use_lora)
            assert 'name = "residual_rms_norm_sandwich' in text, use_lora
    assert len(steps) == 2 * len(_bucket_shapes(runner))


def test_a_decode_step_with_few_adapters_runs_one_launch_per_group():
    """On any machine: with lora_matmul on the decode projections, a decode step whose adapters
    fit in MatmulConfig.shrink_rows (32, the default) runs each group's shrink inside
    lora_matmul: no SGMV launch at all, one ``lora_matmul_shrink32`` launch per group and layer.
    Prefill steps keep the SGMV pair."""
    runner, steps = _lowered_steps(
        use_lora=(True,),
        few_adapters=True,
        prefill_chunk=32,
        projection_kernel="pallas",
        matmul=MatmulConfig(shrink_rows=32),
    )
    for mode, _, text in steps:
        # Per step: two layers a scan iteration where lora_matmul runs every projection.
        layers, unroll = CONFIG.num_layers, 2 if mode == "decode" else 1
        if unroll < layers:
            layers = unroll + layers % unroll
        sgmv = len(re.findall(r'name = "sgmv_', text))
        if mode == "decode":
            assert sgmv == 0 and "lora_matmul_expand" not in text
            assert text.count('name = "lora_matmul_shrink32') >= 4 * layers
        else:
            assert sgmv >= 8 * layers and "lora_matmul" not in text


@pytest.mark.parametrize(
    ("use_lora", "norm_shrink", "swiglu_shrink", "attention_shrink"),
    # (each fused launch alone is counted in tests/test_engine.py's interpreted decode steps;
    # lowering all three together lowers each of their kernels)
    [
        (False, False, False, False),
        (True, False, False, False),
        (True, True, True, True),
    ],
)
def test_residual_norm_steps_lower_and_slice_no_layer_weight(
    use_lora, norm_shrink, swiglu_shrink, attention_shrink
):
    """On any machine: with RunnerConfig.residual_norm="pallas" a decode step (every projection
    in lora_matmul) adds o's and down's partials into the residual stream and normalizes it in
    two residual_rms_norm launches a layer, reading the stacked norm scales in place: its scan
    slices no layer weight at all, not even a norm's scale. Prefill steps are as before. With
    RunnerConfig.norm_shrink those launches also run the q|k|v and gate|up shrinks: two SGMV
    shrinks a layer (o, down) and the first layer's q|k|v shrink before the loop; with
    RunnerConfig.swiglu_shrink as well, down's runs with SwiGLU: o's alone is left; with
    RunnerConfig.attention_shrink (and one kv split) o's runs in the attention launch: none."""
    runner, steps = _lowered_steps(
        use_lora=(use_lora,),
        prefill_chunk=32,
        projection_kernel="pallas",
        residual_norm="pallas",
        norm_shrink=norm_shrink,
        swiglu_shrink=swiglu_shrink,
        attention_shrink=attention_shrink,
        paged_attention=PagedAttentionConfig(pages_per_block=4, kv_splits=1),
    )
    for mode, _, text in steps:
        norms = len(re.findall(r'name = "residual_rms_norm', text))
        fused = len(re.findall(r'name = "residual_rms_norm_shrink', text))
        shrinks = len(re.findall(r'name = "sgmv_shrink', text))
        if mode == "decode":
            layers = 2 + CONFIG.num_layers % 2  # two layers an iteration, and the remainder
            assert norms >= 2 * layers
            assert fused == (norms if norm_shrink else 0)
            swiglus = len(re.findall(r'name = "swiglu_shrink', text))
            assert swiglus == (layers if swiglu_shrink else 0)
            # (a jitted function: its kernel is lowered once, and called for each layer)
            attentions = re.findall(r'name = "(paged_attention_[a-z0-9_]*)', text)
            assert attentions
            assert all(a.endswith("_shrink") == attention_shrink for a in attentions)
            if use_lora:
                in_sgmv = 4 - 2 * norm_shrink - swiglu_shrink - attention_shrink
                assert shrinks == in_sgmv * layers + norm_shrink
            assert _stacked_weight_slices(text, runner.params) == []
        else:
            assert norms == 0
            assert set(_stacked_weight_slices(text, runner.params)) == {(1,)}


@pytest.mark.parametrize("few_adapters", [False, True])
def test_decode_steps_past_plain_max_tokens_run_lora_matmul_only_with_the_k_loop_shrink(
    few_adapters,
):
    """On any machine: a 64-row decode step (above MatmulConfig.plain_max_tokens = 32) runs
    lora_matmul only where its K loop runs the shrink (few adapters; two layers a scan
    iteration); without LoRA, or with many adapters, XLA's GEMMs run it (and the SGMV pair adds
    LoRA), one layer a scan iteration."""
    runner, steps = _lowered_steps(
        few_adapters=few_adapters,
        max_batch=64,
        decode_buckets=(64,),
        prefill_buckets=(1,),
        prefill_chunk=32,
        projection_kernel="pallas",
    )
    decode = {use_lora: text for mode, use_lora, text in steps if mode == "decode"}
    assert "lora_matmul" not in decode[False]
    assert set(_stacked_weight_slices(decode[False], runner.params)) == {(1,)}
    if few_adapters:
        assert "lora_matmul_shrink32" in decode[True] and 'name = "sgmv_' not in decode[True]
        # Nothing sliced: lora_matmul and (the default residual_norm="pallas") the
        # residual_rms_norm launches, two a traced layer, read every weight stacked.
        assert _stacked_weight_slices(decode[True], runner.params) == []
        layers = 2 + CONFIG.num_layers % 2  # two layers a scan iteration, and the remainder
        assert decode[True].count('name = "residual_rms_norm') >= 2 * layers
        assert 'name = "residual_rms_norm' not in decode[False]
    else:
        assert "lora_matmul" not in decode[True]
        assert 'name = "sgmv_shrink' in decode[True] and 'name = "sgmv_expand' in decode[True]
        assert set(_stacked_weight_slices(decode[True], runner.params)) == {(1,)}


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_steps_add_nothing_atomically(deterministic):
    """On any machine: with RunnerConfig.deterministic no kernel of a step adds
    into its output with atomics, so the order in which the GPU runs its programs cannot change
    a bit of the result. A prefill step's tiled shrink (T = 128 tokens: few tiles) splits its
    reduction either way: into partials (kernel names ``..._ks{N}p_...``), or with atomic adds."""
    _, steps = _lowered_steps(
        use_lora=(True,),
        prefill_chunk=64,
        decode_buckets=(4,),
        prefill_buckets=(2,),
        deterministic=deterministic,
    )
    atomics = {}
    for mode, _, text in steps:
        shrinks = set(re.findall(r'name = "(sgmv_shrink_prefill[^"]*)"', text))
        atomics[mode] = (text.count("atomic_rmw"), shrinks)
    assert atomics["decode"] == (0, set())  # 4 tokens: the per-token shrink, never split
    count, shrinks = atomics["prefill"]
    assert shrinks  # 128 tokens: the tiled shrink
    split = {name for name in shrinks if "_ks1_" not in name}
    assert split  # down's 512-wide input: split in 2 or more
    if deterministic:
        assert count == 0 and all(re.search(r"_ks\d+p_", name) for name in split)
    else:
        assert count > 0 and not any(re.search(r"_ks\d+p_", name) for name in split)

"""The library API under bad input from a researcher's own pipeline: each mistake is one of
jaxlora's exceptions naming the argument or field and the expected value (never a traceback
from deep inside numpy or JAX, a hang or a silently wrong answer), and a refused call leaves
the LLM serving with nothing held (KV pages, adapter references, queued requests)."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from configs.models import TINY
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.errors import AdapterError, ConfigError, RequestError
from jaxlora.lora import random_lora_weights
from jaxlora.model import fuse_projections, init_params
from jaxlora.sampling import SamplingParams
from pallas_kernels.layout import MODULES
from tests.test_engine import small_engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def base():
    return init_params(TINY, 0)


@pytest.fixture
def llm(base):
    """A fresh LLM a test: a refusal that did register something cannot fail the next test."""
    return jaxlora.LLM(
        TINY,
        params=base,
        adapters={"good": weights()},
        engine_config=small_engine_config(),
        load_workers=0,
    )


def weights(rank=4, seed=1, dtype=np.float32):
    return random_lora_weights(TINY, "w", rank, MODULES, seed=seed, dtype=dtype)


def assert_nothing_held(llm):
    engine = llm.engine
    assert not engine.has_work() and not engine._by_id
    assert engine.kv.free_pages == engine.engine_config.kv.num_pages
    assert llm.adapters.stats().referenced == 0
    assert llm.adapters.store.names() == ["good"]
    (out,) = llm.generate([[1, 2, 3]], adapter="good", sampling=GREEDY)
    assert len(out.token_ids) == 4 and out.error is None


# -- adapters given as arrays ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, object])
def test_adapter_arrays_of_a_non_float_dtype_are_refused_naming_the_tensor(llm, dtype):
    """Integer or boolean rows (token ids passed by mistake), complex ones (whose imaginary
    part the cast to the pool dropped silently) and object arrays (numpy's TypeError)."""
    bad = weights()
    bad.b["v_proj"] = bad.b["v_proj"].astype(dtype)
    with pytest.raises(
        AdapterError, match=r"tensor b\['v_proj'\] has dtype \w+; expected a floating-point"
    ):
        llm.register_adapter("bad", bad)
    assert_nothing_held(llm)


def test_bfloat16_float16_float64_and_jax_adapter_arrays_are_served_alike(llm):
    reference = llm.adapters.store.load(llm.adapters.store.get("good"))
    for i, dtype in enumerate((jnp.bfloat16, np.float16, np.float64)):
        w = weights(dtype=dtype)
        w.a = {m: jnp.asarray(x) for m, x in w.a.items()}
        name = f"as_{i}"
        llm.register_adapter(name, w)
        packed = llm.adapters.store.load(llm.adapters.store.get(name))
        for axis, block in packed.blocks.items():
            np.testing.assert_allclose(
                np.asarray(block), np.asarray(reference.blocks[axis]), atol=0.02, rtol=0.02
            )
        llm.adapters.unregister(name)
    assert_nothing_held(llm)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda w: setattr(w, "a", None), r"field 'a' is None; expected a dict"),
        (lambda w: setattr(w, "scales", None), r"field 'scales' is None; expected a dict"),
        (
            lambda w: w.a.__setitem__("q_proj", w.a["q_proj"].tolist()),
            r"tensor a\['q_proj'\] is a list; expected a numpy or JAX array",
        ),
        (
            lambda w: w.scales.__setitem__("k_proj", "0.5"),
            r"scales\['k_proj'\] is '0.5'; expected a finite number",
        ),
        (
            lambda w: w.scales.__setitem__("k_proj", np.array([0.5, 1.0])),
            r"scales\['k_proj'\] is array\(\[0.5, 1. \]\); expected a finite number",
        ),
        (
            lambda w: w.scales.__setitem__("k_proj", True),
            r"scales\['k_proj'\] is True; expected a finite number",
        ),
    ],
)
def test_malformed_adapter_containers_are_refused_naming_the_field(llm, spoil, message):
    bad = weights()
    spoil(bad)
    with pytest.raises(AdapterError, match=message):
        llm.register_adapter("bad", bad)
    with pytest.raises(AdapterError, match=message):
        llm.adapters.replace("good", bad)
    assert_nothing_held(llm)


def test_a_scale_given_as_a_0_d_numpy_or_jax_array_is_a_number(llm):
    """alpha / jnp.sqrt(rank) is a 0-d JAX array: taken as its float (the footprint reads
    float(scale)), as before the scales were checked."""
    reference = llm.adapters.store.get("good").footprint.scales
    w = weights()
    w.scales = {
        m: (jnp.float32(s) if i % 2 else np.array(s, np.float64))
        for i, (m, s) in enumerate(w.scales.items())
    }
    llm.register_adapter("arrays", w)
    assert llm.adapters.store.get("arrays").footprint.scales == pytest.approx(reference)
    llm.adapters.unregister("arrays")
    assert_nothing_held(llm)


def test_float64_rows_past_the_pool_dtype_are_refused_not_served_as_inf(llm):
    """float64 rows within float64's range but past float32's (the pool's): the cast made them
    inf in the pool, and every request of the adapter ended in an error blaming its prompt."""
    bad = weights(dtype=np.float64)
    bad.a["q_proj"][1, 2, 3] = 1e300
    with pytest.raises(
        AdapterError, match=r"tensor a\['q_proj'\] holds 1e\+300, past the largest float32"
    ):
        llm.register_adapter("bad", bad)
    assert_nothing_held(llm)


@pytest.mark.parametrize("source", [None, 5, {"a": {}, "b": {}}])
def test_an_adapter_source_of_the_wrong_type_is_refused_naming_it(llm, source):
    expected = r"source: expected a PEFT adapter directory \(a path\) or LoraWeights, got"
    with pytest.raises(AdapterError, match=expected):
        llm.register_adapter("bad", source)
    with pytest.raises(AdapterError, match=expected):
        llm.adapters.replace("good", source)
    assert_nothing_held(llm)


@pytest.mark.parametrize(
    "parts", [5, [("good",)], ["good"], [("good", 1.0, 2.0)], [(["good"], 1.0)]]
)
def test_a_malformed_merge_is_refused_naming_its_parts(llm, parts):
    with pytest.raises(
        AdapterError, match=r"merge 'mix': parts: expected \(adapter name, weight\)"
    ):
        llm.merge_adapters("mix", parts)
    assert_nothing_held(llm)


def test_an_adapter_name_that_is_no_string_is_refused_by_every_lookup(llm):
    for call in (llm.adapters.unregister, llm.adapters.store.get, llm.adapters.pin):
        with pytest.raises(AdapterError, match=r"adapter name \['good'\]: expected a"):
            call(["good"])
    assert_nothing_held(llm)


# -- the engine's own submit -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [[1.5, 2.7], np.array([1.9, 2.2]), "123", [True, 2], None, [[1, 2]], 7],
)
def test_engine_submit_refuses_prompts_that_are_not_token_ids(llm, prompt):
    """Floats were truncated to ids and a string of digits split into one token a digit:
    silently another prompt than the one given."""
    with pytest.raises(RequestError, match=r"prompt_ids: expected a sequence of token ids"):
        llm.engine.submit(prompt, GREEDY)
    assert_nothing_held(llm)


def test_engine_submit_takes_numpy_and_jax_token_ids(llm):
    request = llm.engine.submit(np.array([1, 2, 3], np.int64), GREEDY)
    other = llm.engine.submit(jnp.array([1, 2, 3]), GREEDY)
    llm.engine.run_until_idle()
    assert request.prompt_ids == other.prompt_ids == [1, 2, 3]
    assert request.output_ids == other.output_ids and len(request.output_ids) == 4
    assert_nothing_held(llm)


def test_engine_submit_takes_integer_scalars_of_numpy_and_jax(llm):
    """A list of a JAX array's elements (0-d arrays, as iterating one or an argmax gives) is
    token ids, as LLM.generate takes it; int() took them before the prompt check."""
    for prompt in (list(jnp.array([1, 2, 3])), [np.array(1), jnp.int32(2), np.uint8(3)]):
        request = llm.engine.submit(prompt, GREEDY)
        assert request.prompt_ids == [1, 2, 3] and all(type(t) is int for t in request.prompt_ids)
        llm.engine.run_until_idle()
    for prompt in ([jnp.array(1.0)], [jnp.array(True)], [np.array([1])]):
        with pytest.raises(RequestError, match=r"prompt_ids: expected a sequence of token ids"):
            llm.engine.submit(prompt, GREEDY)
    assert_nothing_held(llm)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"sampling": {"temperature": 0}},
            r"sampling: expected a .*SamplingParams or None, got dict",
        ),
        ({"adapter": ["good"]}, r"adapter: expected a registered adapter's name or None"),
        ({"request_id": 7}, r"request_id: expected a string or None, got 7"),
        ({"share_prompt_with": "req-0"}, r"share_prompt_with: expected a Request or None"),
    ],
)
def test_engine_submit_refuses_arguments_of_the_wrong_type(llm, kwargs, message):
    kwargs = {"sampling": GREEDY, **kwargs}
    with pytest.raises(RequestError, match=message):
        llm.engine.submit([1, 2, 3], **kwargs)
    assert_nothing_held(llm)


def test_a_dict_prompt_s_token_ids_are_never_read_as_text():
    llm = jaxlora.LLM("tiny", engine_config=small_engine_config(), load_workers=0)
    with pytest.raises(RequestError, match=r"prompt_token_ids: expected a list of token ids"):
        llm.generate({"prompt_token_ids": "Hi there"}, sampling=GREEDY)
    assert not llm.engine.has_work()


def test_chat_refuses_conversations_and_template_kwargs_of_the_wrong_type():
    llm = jaxlora.LLM("tiny", engine_config=small_engine_config(), load_workers=0)
    hello = [{"role": "user", "content": "Hi"}]
    with pytest.raises(RequestError, match=r"conversations: expected a list of messages"):
        llm.chat(None, sampling=GREEDY)
    with pytest.raises(RequestError, match=r"conversations: expected a list of messages"):
        llm.chat("Hi", sampling=GREEDY)
    with pytest.raises(RequestError, match=r"chat_template_kwargs: expected a dict or None"):
        llm.chat(hello, sampling=GREEDY, chat_template_kwargs=5)
    assert not llm.engine.has_work()
    (out,) = llm.chat(hello, sampling=GREEDY)
    assert len(out.token_ids) == 4


# -- threads and stopping ----------------------------------------------------------------------


def run_in_threads(*calls, timeout=60):
    results, threads = {}, []
    for i, call in enumerate(calls):

        def target(i=i, call=call):
            try:
                results[i] = call()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                results[i] = e

        threads.append(threading.Thread(target=target, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a call hung"
    return [results[i] for i in range(len(calls))]


def test_generate_from_two_threads_without_the_engine_thread_finishes(llm):
    """Each call stepped the engine itself, both at once: one's step dropped the other's
    launched tokens, and their requests waited for them for ever (a livelock)."""
    sampling = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (expected,) = llm.generate([[1, 2, 3]], adapter="good", sampling=sampling)

    def call():
        return llm.generate([[1, 2, 3]] * 3, adapter="good", sampling=sampling)

    for outs in run_in_threads(call, call):
        assert [o.token_ids for o in outs] == [expected.token_ids] * 3
    assert_nothing_held(llm)


def test_a_generate_waiting_on_the_engine_thread_finishes_after_stop(llm):
    """llm.stop() while another thread's generate waits for the engine thread: nothing stepped
    its requests any more and the call waited for ever."""
    stopped = threading.Thread(target=lambda: None)  # an engine thread about to be stopped
    stopped.start()
    stopped.join()
    llm.engine._thread = stopped
    waiting = threading.Event()
    submit = llm.engine.submit

    def submit_then_signal(*args, **kwargs):
        request = submit(*args, **kwargs)
        waiting.set()
        return request

    llm.engine.submit = submit_then_signal
    try:

        def stop_when_submitted():
            assert waiting.wait(30)
            llm.stop()

        outs, _ = run_in_threads(
            lambda: llm.generate([[1, 2, 3]], adapter="good", sampling=GREEDY),
            stop_when_submitted,
        )
    finally:
        del llm.engine.submit
        llm.engine._thread = None
    assert not isinstance(outs, BaseException), outs
    assert len(outs[0].token_ids) == 4
    assert_nothing_held(llm)


# -- building an LLM or an engine ----------------------------------------------------------------


def test_llm_refuses_bad_constructor_arguments_naming_them(base):
    config = small_engine_config()
    cases = [
        (dict(engine_config={"warmup": False}), r"engine_config: expected an EngineConfig"),
        (dict(engine_config=config, dtype="float33"), r"dtype: 'float33' is not a dtype"),
        (dict(engine_config=config, dtype=jnp.int32), r"dtype: int32; expected a floating"),
        (dict(engine_config=config, tp="2"), r"tp: expected an int >= 1, got '2'"),
        (dict(engine_config=config, tp=0), r"tp: expected an int >= 1, got 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            jaxlora.LLM(TINY, params=base, **kwargs)
    with pytest.raises(ConfigError, match=r"seed: expected an int, got 'a'"):
        jaxlora.LLM("tiny", engine_config=config, seed="a")


@pytest.mark.parametrize(
    "other, message",
    [
        (
            dataclasses.replace(TINY, hidden_size=32, intermediate_size=64),
            r"params\['embed_tokens'\]\['embedding'\] has shape \(512, 32\); expected \(512, 64\)",
        ),
        (
            dataclasses.replace(TINY, vocab_size=256),
            r"params\['embed_tokens'\]\['embedding'\] has shape \(256, 64\); expected \(512, 64\)",
        ),
        (
            dataclasses.replace(TINY, num_layers=3),
            r"params\['layers'\]\['attn'\]\['k_proj'\]\['kernel'\] has shape \(3, 64, 32\); "
            r"expected \(2, 64, 32\)",
        ),
    ],
)
def test_params_of_another_model_are_refused_at_construction(other, message):
    """They failed at the first generate, inside Flax or lax.scan."""
    params = init_params(other, 0)
    with pytest.raises(ConfigError, match=message):
        jaxlora.LLM(TINY, params=params, engine_config=small_engine_config())


def test_params_missing_or_adding_a_leaf_are_refused(base):
    missing = {**base, "norm": {}}
    with pytest.raises(ConfigError, match=r"params\['norm'\]\['scale'\]: missing"):
        jaxlora.LLM(TINY, params=missing, engine_config=small_engine_config())
    extra = {**base, "norm": {**base["norm"], "bias": base["norm"]["scale"]}}
    with pytest.raises(ConfigError, match=r"params\['norm'\]\['bias'\]: not a parameter of"):
        jaxlora.LLM(TINY, params=extra, engine_config=small_engine_config())
    with pytest.raises(ConfigError, match=r"params: expected the model's parameter tree"):
        jaxlora.LLM(TINY, params=[1, 2], engine_config=small_engine_config())
    # an untied checkpoint's LM head given to a model that ties it: the message says so
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    with pytest.raises(
        ConfigError,
        match=r"params\['lm_head'\]\['kernel'\]: not a parameter of .*tie_word_embeddings=True",
    ):
        jaxlora.LLM(tied, params=base, engine_config=small_engine_config())
    # the fused tree is checked in its own shapes
    fused = fuse_projections(base)
    fused["layers"]["mlp"]["gate_up_proj"]["kernel"] = fused["layers"]["mlp"]["gate_up_proj"][
        "kernel"
    ][..., :-1]
    with pytest.raises(ConfigError, match=r"params\['layers'\]\['mlp'\]\['gate_up_proj'\]"):
        jaxlora.LLM(TINY, params=fused, engine_config=small_engine_config())


def test_fused_and_float64_params_are_accepted(base):
    expected = None
    for params in (base, fuse_projections(base), jax.tree.map(np.float64, base)):
        llm = jaxlora.LLM(TINY, params=params, engine_config=small_engine_config())
        (out,) = llm.generate([[1, 2, 3]], sampling=GREEDY)
        expected = expected or out.token_ids
        assert out.token_ids == expected


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("kv", {"page_size": 4}, "a KVCacheConfig"),
        ("runner", None, "a RunnerConfig"),
        ("lora_pool", (16,), "a LoraPoolConfig"),
        ("max_waiting", 0, "an int >= 1"),
        ("max_skips", -1, "an int >= 0"),
        ("compile_threads", 0, "an int >= 1"),
        ("warmup", "no", "a bool"),
        ("async_scheduling", 1, "a bool"),
    ],
)
def test_engine_config_refuses_fields_of_the_wrong_type_or_range(field, value, expected):
    with pytest.raises(
        ConfigError, match=rf"EngineConfig: field '{field}' is .*; expected {expected}"
    ):
        EngineConfig(**{field: value})
    EngineConfig(kv=KVCacheConfig(), runner=RunnerConfig(), max_skips=0, max_waiting=1)

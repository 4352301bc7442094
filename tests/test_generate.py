"""scripts/generate.py's library side: demo adapters answer differently, in one batch."""

import numpy as np
import pytest

from jaxlora.errors import ConfigError, RequestError, UnknownAdapterError
from jaxlora.generate import run_generate
from jaxlora.sampling import SamplingParams


def demo_run(**kwargs):
    """run_generate on the tiny model and its demo adapters, greedy, 12 tokens."""
    defaults = {"adapters": [], "prompts": ["Who are you?"], "max_tokens": 12, "seed": 0}
    return run_generate(model="tiny", temperature=0.0, **{**defaults, **kwargs})


def test_demo_generation_routes_every_prompt_to_its_adapter():
    lines = []
    results = demo_run(out=lines.append)
    by_adapter = {r.adapter: r.text for r in results}
    assert set(by_adapter) == {None, "pirate", "robot", "poet"}
    assert by_adapter["pirate"].startswith(" Arr")
    assert by_adapter["robot"].startswith(" BEEP")
    assert len(set(by_adapter.values())) == 4
    assert "in one batch" in lines[-1] and "step shapes included" in lines[-1]


def test_generation_under_a_constraint_flag(tmp_path):
    """--choice, --regex and --json_schema (@file) constrain every adapter's answers; two of
    them at once, or an unreadable schema file, are refused naming the flags."""
    import json
    import re

    import pytest

    from jaxlora.errors import ConfigError
    from jaxlora.generate import structured_output_flags

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["red", "green", "blue"]}))
    for constraint, valid in (
        (structured_output_flags(choices=["aye", "nay"]), lambda t: t in ("aye", "nay")),
        (
            structured_output_flags(regex="[a-z]{3}[0-9]"),
            lambda t: re.fullmatch("[a-z]{3}[0-9]", t),
        ),
        (
            structured_output_flags(json_schema=f"@{schema}"),
            lambda t: json.loads(t) in ("red", "green", "blue"),
        ),
    ):
        results = demo_run(structured_output=constraint, out=lambda line: None)
        assert len(results) == 4
        for r in results:
            assert r.finish_reason == "stop" and valid(r.text), (constraint.kind, r.text)
    with pytest.raises(ConfigError, match="--regex, --choice: expected at most one"):
        structured_output_flags(regex="a", choices=["a"])
    with pytest.raises(ConfigError, match="--json_schema: cannot read"):
        structured_output_flags(json_schema=f"@{tmp_path / 'missing.json'}")


def test_a_model_without_a_tokenizer_takes_token_id_prompts():
    """A checkpoint with no tokenizer.json (the golden fixture's): prompts are token ids
    ("1 2 3" or "[1, 2, 3]"), answers are printed as token ids; text, or no prompt, is a
    one-line error from the script (exit status 2), not a traceback."""
    import os
    import subprocess
    import sys

    import pytest

    from jaxlora.errors import ConfigError

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(repo, "tests", "fixtures", "golden_phi3", "base")
    adapter = os.path.join(repo, "tests", "fixtures", "golden_phi3", "adapters", "r1_qkv")
    lines = []
    results = run_generate(
        model=base,
        adapters=[f"qkv={adapter}"],
        prompts=["1 2 3", "[4, 5]"],
        max_tokens=3,
        temperature=0.0,
        seed=0,
        out=lines.append,
    )
    assert [r.prompt_ids for r in results[::2]] == [[1, 2, 3], [4, 5]]
    assert all(len(r.token_ids) == 3 for r in results)
    assert lines[0].startswith("[base] [1, 2, 3] -> [") and lines[1].startswith("[qkv] [1, 2, 3]")
    with pytest.raises(ConfigError, match="'hello': model .* has no tokenizer.json"):
        run_generate(
            model=base, adapters=[], prompts=["hello"], max_tokens=1, temperature=0.0, seed=0
        )
    run = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "generate.py"), f"--model={base}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "error: model " in run.stderr and "give --prompt as token ids" in run.stderr


# -- LLM.generate as a vLLM user calls it ------------------------------------------------------


@pytest.fixture(scope="module")
def demo_llm():
    from jaxlora import LLM, demo
    from jaxlora.engine import EngineConfig

    return LLM(
        demo.model_dir(), adapters=demo.adapter_dirs(), engine_config=EngineConfig(warmup=False)
    )


def greedy(max_tokens=3, **kwargs):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def test_generate_takes_one_prompt_and_vllm_s_argument_order(demo_llm):
    """One prompt (text, token ids, a numpy or JAX array, vLLM's prompt dicts) is one request,
    not one a character or a token; a SamplingParams second is vLLM's generate(prompts,
    sampling_params), not an adapter name."""
    import jax.numpy as jnp

    text = "Who are you?"
    ids = demo_llm.tokenizer.encode(text)
    (expected,) = demo_llm.generate([text], sampling=greedy())
    for prompt in (
        text,
        ids,
        np.array(ids),
        jnp.array(ids),
        {"prompt": text},
        {"prompt_token_ids": ids},
        [{"prompt_token_ids": ids}],
    ):
        outs = demo_llm.generate(prompt, sampling=greedy())
        assert [o.token_ids for o in outs] == [expected.token_ids], type(prompt)
        # vLLM's RequestOutput.prompt: the text where the prompt was text
        as_text = isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt" in prompt)
        assert outs[0].prompt == (text if as_text else None), type(prompt)
    outs = demo_llm.generate([text, ids], greedy())
    assert [o.token_ids for o in outs] == [expected.token_ids] * 2
    outs = demo_llm.generate(np.array([ids, ids]), [greedy(), greedy(2)])
    assert [len(o.token_ids) for o in outs] == [3, 2] and outs[0].adapter is None


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda llm: llm.generate(None), RequestError, "prompts: expected a prompt"),
        (lambda llm: llm.generate([None]), RequestError, "prompt: expected text or a list"),
        (lambda llm: llm.generate([[1.5, 2.0]]), RequestError, "token ids \\(ints\\)"),
        (lambda llm: llm.generate([[True, 2]]), RequestError, "token ids \\(ints\\)"),
        (lambda llm: llm.generate(["a", 5]), RequestError, "got 5"),
        (lambda llm: llm.generate([{"text": "a"}]), RequestError, "'prompt_token_ids'"),
        (lambda llm: llm.generate(["a"], sampling={"temperature": 0}), RequestError, "sampling:"),
        (lambda llm: llm.generate(["a"], adapter=[{}]), RequestError, "adapter: expected"),
        (lambda llm: llm.submit("a", sampling={"max_tokens": 2}), RequestError, "sampling:"),
        (lambda llm: llm.generate(["a"], greedy(n=0)), RequestError, "'n': expected an int >= 1"),
        (lambda llm: llm.generate(["a"], greedy(n="2")), RequestError, "'n': expected an int"),
        (lambda llm: llm.submit("a", sampling=greedy(n=2)), RequestError, "'n': a request is one"),
    ],
)
def test_generate_refuses_bad_arguments_naming_them(demo_llm, call, error, message):
    with pytest.raises(error, match=message):
        call(demo_llm)
    assert not demo_llm.engine.has_work()


def test_llm_refuses_a_bad_model_or_adapters_argument():
    from jaxlora import LLM, demo

    with pytest.raises(ConfigError, match="adapters: expected a mapping"):
        LLM(demo.model_dir(), adapters=list(demo.adapter_dirs().values()))
    with pytest.raises(ConfigError, match="model: expected a preset name"):
        LLM(None)


def test_a_refused_or_interrupted_generate_leaves_no_request_behind(demo_llm, monkeypatch):
    """A prompt refused after others were queued, or an interrupted run, cancels the call's
    requests: the next call computes only its own tokens."""
    stats = demo_llm.engine.stats
    with pytest.raises(UnknownAdapterError):
        demo_llm.generate(
            ["Hi", "Hello", "Hey"], adapter=[None, "pirate", "nope"], sampling=greedy()
        )
    with pytest.raises(RequestError, match="context length"):
        demo_llm.generate(["Hi", "a " * 5000], sampling=greedy())
    assert not demo_llm.engine.has_work()
    before = stats.generated_tokens
    demo_llm.generate(["Hi"], sampling=greedy(4))
    assert stats.generated_tokens - before == 4

    def interrupted(max_steps=None):
        demo_llm.engine.step()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(demo_llm.engine, "run_until_idle", interrupted)
        with pytest.raises(KeyboardInterrupt):
            demo_llm.generate(["Hi", "Hello"], sampling=greedy(8))
    before = stats.generated_tokens
    demo_llm.generate(["Hi"], sampling=greedy(4))
    assert stats.generated_tokens - before == 4 and not demo_llm.engine.has_work()


def test_completion_carries_the_top_logprobs_asked_for(demo_llm):
    """SamplingParams(logprobs=n): each output token's n most likely tokens, the greedy token
    first with its own logprob."""
    (out,) = demo_llm.generate(["Who are you?"], sampling=greedy(3, logprobs=2))
    assert len(out.top_logprobs) == len(out.token_ids) == len(out.logprobs) == 3
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert len(top) == 2 and next(iter(top)) == token and top[token] == logprob
    (plain,) = demo_llm.generate(["Who are you?"], sampling=greedy(3, logprobs=0))
    assert plain.top_logprobs is None and len(plain.logprobs) == 3


def test_n_samples_of_a_prompt_come_back_in_its_outputs_as_vllm_s(demo_llm):
    """SamplingParams(n=k): k samples of each prompt in its Completion's outputs (vLLM's
    RequestOutput.outputs), sample i drawn from seed + i as the server's choice i is; the top
    level is the first sample; the prompt is computed once for all of them."""
    import dataclasses

    sampled = SamplingParams(
        n=3, temperature=3.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=0
    )
    prompts = ["Who are you?", "Hi"]
    outs = demo_llm.generate(prompts, "pirate", sampled)
    assert [len(o.outputs) for o in outs] == [3, 3]
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.prompt_token_ids == demo_llm.tokenizer.encode(prompt)
        assert [o.index for o in out.outputs] == [0, 1, 2] and out.finished
        first = out.outputs[0]
        assert (out.text, out.token_ids, out.logprobs) == (
            first.text,
            first.token_ids,
            first.logprobs,
        )
        assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # (3.0: they differ)
        for o in out.outputs:
            assert len(o.token_ids) == 8 and o.finish_reason == "length"
            assert o.cumulative_logprob == pytest.approx(sum(o.logprobs))
    # the same call again: the same samples; sample i is one request seeded seed + i
    again = demo_llm.generate(prompts, "pirate", sampled)
    assert [[o.token_ids for o in c.outputs] for c in again] == [
        [o.token_ids for o in c.outputs] for c in outs
    ]
    for i in range(3):
        (alone,) = demo_llm.generate(
            prompts[0], "pirate", dataclasses.replace(sampled, n=1, seed=7 + i)
        )
        assert alone.token_ids == outs[0].outputs[i].token_ids
    # the samples of one prompt share its pages: its full pages are computed once
    page = demo_llm.engine.engine_config.kv.page_size
    long_prompt = list(range(1, 3 * page + 2))
    stats = demo_llm.engine.stats
    computed, shared = stats.prompt_tokens, stats.shared_prompt_tokens
    (out,) = demo_llm.generate([long_prompt], sampling=greedy(2, n=4))
    assert stats.shared_prompt_tokens - shared == 3 * 3 * page
    assert stats.prompt_tokens - computed <= len(long_prompt) + 3  # (not 4 x 49)
    assert len({tuple(o.token_ids) for o in out.outputs}) == 1  # (greedy: all alike)
    assert not demo_llm.engine.has_work()


def test_vllm_s_keyword_names_sampling_params_and_lora_request(demo_llm):
    """vLLM's generate(prompts, sampling_params=..., lora_request=LoRARequest(name, id, path)):
    a registered name is served; an unregistered one is registered from its path first; a
    name registered from another directory, or none and no path, is refused naming it."""
    from jaxlora import LoRARequest, demo
    from jaxlora.errors import UnknownAdapterError

    prompts = ["Who are you?", "Hi"]
    by_name = demo_llm.generate(prompts, ["pirate", None], greedy(6))
    outs = demo_llm.generate(
        prompts, sampling_params=greedy(6), lora_request=[LoRARequest("pirate", 1), None]
    )
    assert [o.token_ids for o in outs] == [o.token_ids for o in by_name]
    assert [o.adapter for o in outs] == ["pirate", None]
    stopped = demo_llm.generate(
        prompts[0],
        sampling_params=SamplingParams(temperature=0, max_tokens=12, stop=","),
        lora_request=LoRARequest("pirate", 1),
    )
    assert (stopped[0].text, stopped[0].stop_reason) == (" Arr", ",")
    robot = demo.adapter_dirs()["robot"]
    assert "robot_again" not in demo_llm.store
    (out,) = demo_llm.generate(
        prompts[0], greedy(6), lora_request=LoRARequest("robot_again", 2, robot)
    )
    assert "robot_again" in demo_llm.store
    (as_robot,) = demo_llm.generate(prompts[0], "robot", greedy(6))
    assert out.token_ids == as_robot.token_ids and out.adapter == "robot_again"
    (chatted,) = demo_llm.chat(
        [{"role": "user", "content": "Hi"}],
        sampling_params=greedy(6),
        lora_request=LoRARequest("robot_again", 2, robot),
    )
    (chat_robot,) = demo_llm.chat([{"role": "user", "content": "Hi"}], "robot", greedy(6))
    assert chatted.token_ids == chat_robot.token_ids
    refusals = [
        (
            dict(lora_request=LoRARequest("robot_again", 2, demo.adapter_dirs()["poet"])),
            RequestError,
            "'robot_again' is registered from .*robot",
        ),
        (dict(lora_request=LoRARequest("nobody", 3)), UnknownAdapterError, "'nobody': no adapter"),
        (dict(lora_request="pirate"), RequestError, "expected a LoRARequest"),
        (
            dict(adapter="pirate", lora_request=LoRARequest("pirate", 1)),
            RequestError,
            "beside adapter",
        ),
        (dict(sampling=greedy(), sampling_params=greedy()), RequestError, "beside sampling"),
    ]
    for kwargs, error, message in refusals:
        with pytest.raises(error, match=message):
            demo_llm.generate(prompts, **{"sampling": greedy(), **kwargs})
    assert not demo_llm.engine.has_work()


def test_vllm_s_priority_and_chat_template_arguments(demo_llm, monkeypatch):
    """generate(priority=[...]): one a prompt, each request's (its samples' too), under the
    priority policy only; chat(chat_template=...): the prompt rendered by that template."""
    import dataclasses

    messages = [{"role": "user", "content": "Hi"}]
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (own,) = demo_llm.chat(messages, None, greedy(2), chat_template=template)
    (default,) = demo_llm.chat(messages, None, greedy(2))
    assert own.prompt_ids == demo_llm.tokenizer.encode_chat(messages, template=template)
    assert own.prompt_ids != default.prompt_ids
    with pytest.raises(RequestError, match="chat_template"):
        demo_llm.chat(messages, None, greedy(2), chat_template="{% for %}")
    with pytest.raises(RequestError, match="needs the 'priority' scheduling policy"):
        demo_llm.generate(["Hi", "Hello"], greedy(2), priority=[1, 0])
    with pytest.raises(RequestError, match="a list of 2 ints"):
        demo_llm.generate(["Hi", "Hello"], greedy(2), priority=[0])
    by_priority = dataclasses.replace(demo_llm.engine_config, scheduling_policy="priority")
    monkeypatch.setattr(demo_llm, "engine_config", by_priority)
    monkeypatch.setattr(demo_llm.engine, "engine_config", by_priority)
    submitted, submit = [], demo_llm.engine.submit

    def recording(*args, **kwargs):
        submitted.append(kwargs["priority"])
        return submit(*args, **kwargs)

    monkeypatch.setattr(demo_llm.engine, "submit", recording)
    outs = demo_llm.generate(["Hi", "Hello"], greedy(2, n=2), priority=[3, -1])
    assert submitted == [3, 3, -1, -1] and [len(o.outputs) for o in outs] == [2, 2]
    assert not demo_llm.engine.has_work()


def test_truncate_prompt_tokens_keeps_the_prompt_s_last_tokens(demo_llm):
    """SamplingParams(truncate_prompt_tokens=k) as vLLM's: the request's prompt is the last k
    tokens (-1: the context length), so a prompt too long for the context is cut, not refused;
    the same prompt cut two ways is two prompts (no page shared between them)."""
    limit = demo_llm.engine_config.kv.max_model_len
    long_prompt = [1 + i % 50 for i in range(limit + 20)]
    with pytest.raises(RequestError, match="context length"):
        demo_llm.generate([long_prompt], greedy(2))
    cut, whole = demo_llm.generate(
        [long_prompt, long_prompt[-9:]],
        [greedy(2, truncate_prompt_tokens=9), greedy(2)],
    )
    assert cut.prompt_ids == long_prompt[-9:] and cut.token_ids == whole.token_ids
    two_ways = demo_llm.generate(
        [long_prompt] * 2, [greedy(2, truncate_prompt_tokens=k) for k in (9, 30)]
    )
    assert [len(o.prompt_ids) for o in two_ways] == [9, 30]
    with pytest.raises(RequestError, match="the context length is"):  # (-1: all of it)
        demo_llm.generate([long_prompt], greedy(2, truncate_prompt_tokens=-1))
    assert not demo_llm.engine.has_work()


def test_use_tqdm_draws_vllm_s_progress_bar_on_stderr(demo_llm, capsys):
    """use_tqdm=True: the prompts done and the output tokens a second, stepping the engine here
    or waiting on its thread; the answers are those without the bar."""
    prompts = ["Hi", "Hello", "Who are you?"]
    plain = demo_llm.generate(prompts, greedy(4))
    assert capsys.readouterr().err == ""
    outs = demo_llm.generate(prompts, greedy(4), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "toks/s" in err, err
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    demo_llm.start()
    try:
        outs = demo_llm.chat([{"role": "user", "content": "Hi"}], None, greedy(4), use_tqdm=True)
    finally:
        demo_llm.stop()
    assert "1/1" in capsys.readouterr().err and len(outs[0].token_ids) == 4
    with pytest.raises(RequestError, match="use_tqdm: expected a bool, got 'yes'"):
        demo_llm.generate(prompts, greedy(4), use_tqdm="yes")
    assert not demo_llm.engine.has_work()


def test_vllm_s_engine_arguments_size_the_engine_as_serve_py_does(demo_llm, monkeypatch):
    """LLM(model, max_model_len=..., max_num_seqs=..., max_lora_rank=..., ...) as vLLM's: the
    engine serve.py's same flags give; its answers are the model's; an argument this LLM does
    not take, a bad value, or one beside engine_config is refused naming it."""
    import dataclasses

    import jaxlora
    from jaxlora import demo
    from jaxlora import llm as llm_module
    from jaxlora.engine import EngineConfig
    from jaxlora.server.launch import LaunchConfig, engine_config_for

    @dataclasses.dataclass(frozen=True)
    class NoWarmup(EngineConfig):  # (the warm-up compiles every step shape: ~40 s here)
        warmup: bool = False

    monkeypatch.setattr(llm_module, "EngineConfig", NoWarmup)
    vllm_args = dict(
        max_model_len=64,
        max_num_seqs=4,
        max_num_batched_tokens=48,
        block_size=8,
        enable_prefix_caching=True,
        max_lora_rank=16,
        max_loras=2,
        enforce_eager=True,
    )
    llm = jaxlora.LLM(demo.model_dir(), adapters=demo.adapter_dirs(), **vllm_args)
    flags = LaunchConfig(
        model=demo.model_dir(),
        max_model_len=64,
        max_batch=4,
        max_num_tokens=48,
        page_size=8,
        enable_prefix_caching=True,
        max_rank=16,
        max_slots=2,
    )
    assert llm.engine_config == engine_config_for(llm.config, flags)
    assert (llm.engine_config.runner.max_batch, llm.engine_config.lora_pool.max_slots) == (4, 2)
    prompts, adapters = ["Who are you?", "Hi"], ["pirate", None]
    outs = llm.generate(prompts, adapters, greedy(4))
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in demo_llm.generate(prompts, adapters, greedy(4))
    ]
    refusals = [
        (dict(quantization="awq"), r"LLM\(quantization=...\): not an argument of this LLM"),
        (dict(max_num_seqs=0), r"LLM\(max_num_seqs=0\): --max_batch: expected an int >= 1"),
        (dict(max_num_seqs=4, engine_config=NoWarmup()), "engine_config: given beside"),
        (dict(enable_lora=False), "adapters: .* given with enable_lora=False"),
        (dict(tp=2, tensor_parallel_size=2), "both are the tensor-parallel size"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ConfigError, match=message):
            jaxlora.LLM(demo.model_dir(), adapters=demo.adapter_dirs(), **kwargs)
    # vLLM's tokenizer argument: a directory to read one from
    by_path = jaxlora.LLM(demo.model_dir(), tokenizer=demo.model_dir(), max_num_seqs=2)
    assert by_path.tokenizer.encode("Who are you?") == demo_llm.tokenizer.encode("Who are you?")
    with pytest.raises(ConfigError, match="--tokenizer="):
        jaxlora.LLM(demo.model_dir(), tokenizer="/nonexistent/tokenizer", max_num_seqs=2)


def test_an_adapter_flag_given_twice_is_refused():
    from jaxlora.generate import parse_adapter_flags

    with pytest.raises(ConfigError, match="'a' given twice"):
        parse_adapter_flags(["a=/x", "b=/y", "a=/z"])


def test_stream_without_a_running_engine_is_refused_not_hung(demo_llm):
    import asyncio

    async def first_delta():
        async for delta in demo_llm.stream("Hi", sampling=greedy(2)):
            return delta

    with pytest.raises(RequestError, match="call llm.start\\(\\) first"):
        asyncio.run(asyncio.wait_for(first_delta(), timeout=5))
    assert not demo_llm.engine.has_work()

"""The OpenAI-compatible server against the official openai client: routing of the demo adapters
in shared batches, streaming, n / seed / stop / logprobs, every error path, disconnects, runtime
adapter loading while other requests stream, and /metrics."""

import asyncio
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import jaxlora
from jaxlora import demo
from jaxlora.config import RopeScaling
from jaxlora.errors import AdapterError, ConfigError
from jaxlora.sampling import SamplingParams
from jaxlora.server import resolve_adapter_path
from jaxlora.server.config import ServerConfig
from jaxlora.server.launch import (
    SIZE_FIELDS,
    LaunchConfig,
    banner,
    engine_config_for,
    parse_fair_share_weights,
    parse_lora_modules,
)
from tests.test_server_helpers import (
    API_KEY,
    demo_engine_config,
    engine_idle,
    launch_configs_of,
    metric,
    parse_metrics,
    start_demo_server,
    wait_until,
)

BASE = demo.DEMO_MODEL_NAME
VOICES = {BASE: demo.BASE_SIGNATURE, **demo.DEMO_SIGNATURES}
GREEDY = {"temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    """An allowed root with a copy of a demo adapter and broken ones, and a secret outside it."""
    base = tmp_path_factory.mktemp("adapters")
    root = base / "root"
    root.mkdir()
    shutil.copytree(demo.adapter_dirs()["pirate"], root / "pirate_copy")
    shutil.copytree(demo.adapter_dirs()["robot"], root / "robot_copy")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(demo.adapter_dirs()["poet"], "adapter_config.json"), pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    broken = root / "broken_config"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    shutil.copy(os.path.join(demo.adapter_dirs()["poet"], "adapter_model.safetensors"), broken)
    outside = base / "outside"
    shutil.copytree(demo.adapter_dirs()["poet"], outside)
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    return str(root), str(outside)


@pytest.fixture(scope="module")
def served(adapter_root):
    server, state = start_demo_server(
        max_batch=4, max_waiting=32, adapter_roots=(adapter_root[0],), disconnect_poll_s=0.05
    )
    yield server, state
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient_factory(served):
    return lambda: openai.AsyncOpenAI(
        base_url=served[0].base_url, api_key=API_KEY, max_retries=0, timeout=60
    )


def chat(client, model, content=demo.DEMO_PROMPTS[0], **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **{**GREEDY, **kw}
    )


# ---------------------------------------------------------------------------- happy paths


def test_models_lists_base_and_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {BASE, *demo.DEMO_SIGNATURES}
    assert cards[BASE].model_extra["parent"] is None
    for name in demo.DEMO_SIGNATURES:
        assert cards[name].model_extra["parent"] == BASE
        assert cards[name].model_extra["root"] == demo.adapter_dirs()[name]
    assert client.models.retrieve("pirate").id == "pirate"


def test_every_model_answers_in_its_own_voice_in_shared_batches(served, aclient_factory):
    """Completions and chats, streamed and not, for the base model and every adapter at once."""

    async def one(aclient, model, prompt, mode, stream):
        if mode == "chat":
            kwargs = {"messages": [{"role": "user", "content": prompt}]}
            create = aclient.chat.completions.create
        else:
            kwargs = {"prompt": prompt}
            create = aclient.completions.create
        if not stream:
            out = await create(model=model, **kwargs, **GREEDY)
            choice = out.choices[0]
            return (choice.message.content if mode == "chat" else choice.text, choice.finish_reason)
        text, finish = "", None
        async for chunk in await create(model=model, stream=True, **kwargs, **GREEDY):
            for choice in chunk.choices:
                piece = choice.delta.content if mode == "chat" else choice.text
                text += piece or ""
                finish = choice.finish_reason or finish
        return text, finish

    async def run_all():
        aclient = aclient_factory()
        cases = [
            (model, prompt, mode, stream)
            for model in VOICES
            for prompt in demo.DEMO_PROMPTS
            for mode in ("chat", "completion")
            for stream in (False, True)
        ]
        async with aclient:
            results = await asyncio.gather(*(one(aclient, *case) for case in cases))
        return cases, results

    steps_before = served[1].engine.stats.steps
    cases, results = asyncio.run(run_all())
    for (model, _, mode, _), (text, finish) in zip(cases, results, strict=True):
        lead = " " if mode == "completion" else ""
        assert (text, finish) == (lead + VOICES[model], "stop"), (model, mode)
    # 32 requests took far fewer steps than 32 one-at-a-time runs would (about 20 each).
    assert served[1].engine.stats.steps - steps_before < 32 * 20 / 2


def test_streaming_chunks_match_the_whole_answer_and_report_usage(client):
    whole = client.completions.create(model="robot", prompt="Hello", **GREEDY)
    stream = client.completions.create(
        model="robot", prompt="Hello", stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id}
    texts = "".join(ch.text for c in chunks for ch in c.choices)
    assert texts == whole.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chat_chunks = list(chat(client, "poet", stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chat_chunks)
        == demo.DEMO_SIGNATURES["poet"]
    )
    assert chat_chunks[-1].choices[0].finish_reason == "stop"

    # vLLM's continuous_usage_stats: every chunk carries the usage so far.
    for create, kwargs in (
        (client.completions.create, {"prompt": "Hello"}),
        (client.chat.completions.create, {"messages": [{"role": "user", "content": "Hello"}]}),
    ):
        counted = list(
            create(
                model="robot",
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                **kwargs,
                **GREEDY,
            )
        )
        completions = [c.usage.completion_tokens for c in counted]
        assert completions == sorted(completions) and completions[-1] > completions[0]
        assert {c.usage.prompt_tokens for c in counted} == {counted[-1].usage.prompt_tokens}
        assert counted[-1].choices == []
    alone = list(
        client.completions.create(
            model="robot",
            prompt="Hello",
            stream=True,
            stream_options={"include_usage": False, "continuous_usage_stats": True},
            **GREEDY,
        )
    )
    # needs include_usage, as vLLM's does (which is true unless given false)
    assert all(c.usage is None for c in alone)


def test_n_seed_stop_and_logprobs(served, client):
    sampled = dict(
        model="pirate",
        prompt="Tell me a joke.",
        n=3,
        temperature=1.5,
        seed=1234,
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    first = client.completions.create(**sampled)
    again = client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 36
    # the same n choices streamed: chunks of the three interleave, each ends once
    texts, finishes = ["", "", ""], [0, 0, 0]
    chunks = list(
        client.completions.create(**sampled, stream=True, stream_options={"include_usage": True})
    )
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] += choice.finish_reason is not None
    assert texts == [c.text for c in first.choices] and finishes == [1, 1, 1]
    assert chunks[-1].usage.completion_tokens == 36

    stopped = client.completions.create(model="pirate", prompt="Hi", stop=["!"], **GREEDY)
    assert stopped.choices[0].text == " Arr, matey"
    assert stopped.choices[0].finish_reason == "stop"
    kept = dict(model="pirate", prompt="Hi", stop=["!"], **GREEDY)
    kept["extra_body"] = {"include_stop_str_in_output": True}
    assert client.completions.create(**kept).choices[0].text == " Arr, matey!"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kept, stream=True))
    assert streamed == " Arr, matey!"
    short = client.completions.create(model="pirate", prompt="Hi", temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3

    scored = client.completions.create(model="robot", prompt="Hi", logprobs=2, **GREEDY)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == scored.usage.completion_tokens
    assert "".join(lp.tokens[:-1]) == scored.choices[0].text  # the last one is EOS
    # (the token itself among its alternatives, as OpenAI's legacy API gives it)
    assert all(
        len(top) <= 3 and max(top.values()) >= tok_lp - 1e-5 and top[token] == tok_lp
        for top, tok_lp, token in zip(lp.top_logprobs, lp.token_logprobs, lp.tokens, strict=True)
    )
    hot = client.completions.create(
        model="robot", prompt="Hi", logprobs=1, temperature=3.0, seed=1, max_tokens=12
    ).choices[0]
    tops = hot.logprobs.top_logprobs
    assert all(
        top[t] == t_lp
        for top, t_lp, t in zip(tops, hot.logprobs.token_logprobs, hot.logprobs.tokens, strict=True)
    )
    assert any(len(top) == 2 for top in tops)  # sampled tokens below the most likely one
    chat_scored = chat(client, "robot", logprobs=True, top_logprobs=3)
    content = chat_scored.choices[0].logprobs.content
    assert len(content) == chat_scored.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    # vLLM's return_tokens_as_token_ids: the same logprobs, tokens named by their ids.
    as_ids = {"return_tokens_as_token_ids": True}
    ids = client.completions.create(
        model="robot", prompt="Hi", logprobs=2, **GREEDY, extra_body=as_ids
    ).choices[0]
    token_ids = [int(t.removeprefix("token_id:")) for t in ids.logprobs.tokens]
    assert served[1].tokenizer.decode(token_ids) == scored.choices[0].text
    np.testing.assert_allclose(ids.logprobs.token_logprobs, lp.token_logprobs, atol=1e-5)
    assert all(k.startswith("token_id:") for top in ids.logprobs.top_logprobs for k in top)
    chat_ids = chat(client, "robot", logprobs=True, top_logprobs=3, extra_body=as_ids)
    entries = chat_ids.choices[0].logprobs.content
    np.testing.assert_allclose(
        [e.logprob for e in entries], [c.logprob for c in content], atol=1e-5
    )
    assert all(e.token.startswith("token_id:") for e in entries)
    streamed_ids = client.chat.completions.create(
        model="robot",
        messages=[{"role": "user", "content": demo.DEMO_PROMPTS[0]}],
        logprobs=True,
        stream=True,
        **GREEDY,
        extra_body=as_ids,
    )
    tokens = [
        e.token
        for c in streamed_ids
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in entries]

    echoed = client.completions.create(model=BASE, prompt="Hi", echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hi " + demo.BASE_SIGNATURE
    batch = client.completions.create(model="poet", prompt=["Hi", "Hello"], n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {" " + demo.DEMO_SIGNATURES["poet"]}
    by_ids = client.completions.create(
        model="poet", prompt=served[1].tokenizer.encode("Hi"), **GREEDY
    )
    assert by_ids.choices[0].text == batch.choices[0].text


def test_return_token_ids_gives_the_prompt_and_output_ids(served, client):
    """vLLM's return_token_ids: each completion choice carries its prompt's token ids (the ones
    the model saw) and its output's (the EOS it sampled included: usage's count); a chat its
    prompt's once and each choice's output ids. Streamed, the prompt's come with the first chunk
    and the output's chunk by chunk, adding up to the unstreamed answer's. Without the field an
    answer carries neither."""
    tokenizer = served[1].tokenizer
    ask = {"extra_body": {"return_token_ids": True}}
    plain = client.completions.create(model="robot", prompt=["Hi", "Hello"], **GREEDY)
    assert all("token_ids" not in c.model_extra for c in plain.choices)
    answer = client.completions.create(model="robot", prompt=["Hi", "Hello"], **GREEDY, **ask)
    for choice, prompt, before in zip(answer.choices, ["Hi", "Hello"], plain.choices, strict=True):
        ids = choice.model_extra["token_ids"]
        assert choice.text == before.text and tokenizer.decode(ids) == choice.text
        assert ids[-1] in served[1].llm.engine.eos_ids  # (the text leaves EOS out)
        assert choice.model_extra["prompt_token_ids"] == tokenizer.encode(prompt)
    assert answer.usage.completion_tokens == sum(
        len(c.model_extra["token_ids"]) for c in answer.choices
    )
    by_ids = client.completions.create(
        model="robot", prompt=[5, 9, 13], **GREEDY, extra_body={"return_token_ids": True}
    )
    assert by_ids.choices[0].model_extra["prompt_token_ids"] == [5, 9, 13]
    truncated = client.completions.create(
        model="robot",
        prompt=[5, 9, 13, 17],
        **GREEDY,
        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 2},
    )
    assert truncated.choices[0].model_extra["prompt_token_ids"] == [13, 17]  # what it saw

    streamed = list(
        client.completions.create(model="robot", prompt="Hi", stream=True, **GREEDY, **ask)
    )
    extras = [c.choices[0].model_extra for c in streamed if c.choices]
    ids = [t for e in extras for t in e["token_ids"]]
    assert ids == answer.choices[0].model_extra["token_ids"]
    firsts = [e["prompt_token_ids"] for e in extras if "prompt_token_ids" in e]
    assert firsts == [tokenizer.encode("Hi")] and "prompt_token_ids" in extras[0]

    chat_plain = chat(client, "robot")
    assert "prompt_token_ids" not in chat_plain.model_extra
    chat_ids = chat(client, "robot", n=2, **ask)
    prompt_ids = chat_ids.model_extra["prompt_token_ids"]
    assert len(prompt_ids) == chat_ids.usage.prompt_tokens
    for choice in chat_ids.choices:
        ids = choice.model_extra["token_ids"]
        assert choice.message.content == chat_plain.choices[0].message.content
        assert tokenizer.decode(ids) == choice.message.content
    chunks = list(
        client.chat.completions.create(
            model="robot",
            messages=[{"role": "user", "content": demo.DEMO_PROMPTS[0]}],
            stream=True,
            **GREEDY,
            **ask,
        )
    )
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == chat_ids.choices[0].model_extra["token_ids"]


def test_return_token_ids_streams_the_tokens_of_a_model_without_a_tokenizer():
    """A preset (random weights, no tokenizer) streams no text: with return_token_ids every
    chunk that adds tokens still goes out, carrying them, and they are the unstreamed answer's
    (before, such a stream sent only its finish chunk)."""
    from configs.models import MODEL_PRESETS
    from jaxlora.server import BackgroundServer, ServingState, create_app

    # (the tiny preset's config without its name: random weights, no tokenizer)
    config = demo_engine_config(max_batch=2, max_waiting=8)
    llm = jaxlora.LLM(MODEL_PRESETS["tiny"], engine_config=config)
    assert llm.tokenizer is None

    state = ServingState(llm, ServerConfig(model_name="tiny", api_key=API_KEY))
    server = BackgroundServer(create_app(state)).start()
    try:
        tiny = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        body = dict(model="tiny", prompt=[3, 4, 5], temperature=0, max_tokens=6)
        ask = {"extra_body": {"return_token_ids": True, "ignore_eos": True}}
        answer = tiny.completions.create(**body, **ask).choices[0]
        assert answer.text == "" and len(answer.model_extra["token_ids"]) == 6
        chunks = [c.choices[0] for c in tiny.completions.create(**body, stream=True, **ask)]
        assert [t for c in chunks for t in c.model_extra["token_ids"]] == answer.model_extra[
            "token_ids"
        ]
        assert len(chunks) >= 6 and chunks[0].model_extra["prompt_token_ids"] == [3, 4, 5]
    finally:
        server.stop()
        llm.stop()


def test_the_choices_of_a_request_compute_its_prompt_once(served, client):
    """n = 3 sampled choices of a 5-page prompt: the second and third take the first's 4 full
    pages (page size 8) instead of computing them; choice i is what n = 1 with seed + i
    gives."""
    stats = served[1].engine.stats
    prompt = list(range(10, 47))  # 37 tokens: 4 full pages and 5 tokens
    before = stats.shared_prompt_tokens
    many = client.completions.create(
        model="poet", prompt=prompt, n=3, seed=11, temperature=3.0, max_tokens=6
    )
    assert stats.shared_prompt_tokens - before == 2 * 32
    for i, choice in enumerate(many.choices):
        one = client.completions.create(
            model="poet", prompt=prompt, seed=11 + i, temperature=3.0, max_tokens=6
        )
        assert choice.text == one.choices[0].text
    assert len({c.text for c in many.choices}) > 1


def test_logit_bias_penalties_min_p_and_min_tokens_reach_the_sampler(served, client):
    """OpenAI's logit_bias and penalties and vLLM's repetition_penalty, min_p and min_tokens
    change the answer as they should; logprobs stay the model's own."""
    tokenizer = served[1].tokenizer
    plain = client.completions.create(model="pirate", prompt="Hi", **GREEDY)
    # The same request made to the engine, for its token ids.
    request = served[1].engine.submit(
        tokenizer.encode("Hi"), SamplingParams(temperature=0, max_tokens=40), adapter="pirate"
    )
    assert request.wait(timeout=60)
    ids = request.output_ids
    assert tokenizer.decode(ids) == plain.choices[0].text and len(ids) > 3
    # +100 on one token: every token is it.
    forced = client.completions.create(
        model="pirate", prompt="Hi", temperature=0, max_tokens=4, logit_bias={str(ids[2]): 100}
    )
    assert forced.choices[0].text == tokenizer.decode([ids[2]] * 4)
    # -100 on the first token: the answer starts otherwise; sampled rows too.
    plain_first = tokenizer.decode([ids[0]], skip_special_tokens=False)
    for temperature in (0, 0.7):
        banned = client.completions.create(
            model="pirate",
            prompt="Hi",
            max_tokens=3,
            temperature=temperature,
            seed=3,
            logit_bias={str(ids[0]): -100},
            logprobs=0,
        )
        assert banned.choices[0].logprobs.tokens[0] != plain_first
    # min_tokens: EOS (the plain answer's last token) cannot end it before then.
    longer = client.completions.create(
        model="pirate", prompt="Hi", temperature=0, max_tokens=40, extra_body={"min_tokens": 30}
    )
    assert longer.usage.completion_tokens >= 30
    assert longer.choices[0].text.startswith(plain.choices[0].text)
    # Penalties that punish repeats, and ones that reward them, both answer; rewarding them
    # (frequency -2, repetition 0.2) repeats a token.
    penalised = client.completions.create(
        model="pirate",
        prompt="Hi",
        temperature=0,
        max_tokens=12,
        presence_penalty=2,
        frequency_penalty=2,
        extra_body={"repetition_penalty": 1.5, "min_p": 0.1},
    )
    assert penalised.choices[0].finish_reason in ("stop", "length")
    looping = client.completions.create(
        model="pirate",
        prompt="Hi",
        temperature=0,
        max_tokens=12,
        frequency_penalty=-2,
        logprobs=0,
        extra_body={"repetition_penalty": 0.2, "ignore_eos": True},
    )
    tokens = looping.choices[0].logprobs.tokens
    assert len(set(tokens)) < len(tokens)
    assert all(lp <= 0 for lp in looping.choices[0].logprobs.token_logprobs)
    chat_biased = chat(client, "pirate", max_tokens=3, logit_bias={str(ids[1]): 100})
    assert chat_biased.choices[0].message.content == tokenizer.decode([ids[1]] * 3)


def test_echo_with_logprobs_scores_the_prompt(served, client):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs=1, max_tokens=1,
    greedy): every prompt token gets its logprob (the first none), equal to the engine's prompt
    logprobs; streamed, the first chunk carries them; text prompts and logprobs=0 too."""
    tokenizer = served[1].tokenizer
    ids = tokenizer.encode("Tell me a joke, robot.")
    asked = dict(model="robot", echo=True, logprobs=1, max_tokens=1, temperature=0)
    whole = client.completions.create(prompt=ids, **asked)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert whole.choices[0].text.startswith(tokenizer.decode(ids))
    request = served[1].engine.submit(
        ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), adapter="robot"
    )
    assert request.wait(timeout=60)
    np.testing.assert_allclose(
        lp.token_logprobs[1 : len(ids)], request.prompt_logprobs[1:], rtol=1e-6, atol=1e-6
    )
    for top, token_lp, token in zip(
        lp.top_logprobs[1:], lp.token_logprobs[1:], lp.tokens[1:], strict=True
    ):
        assert len(top) in (1, 2) and max(top.values()) >= token_lp - 1e-6
        assert top[token] == token_lp
    plain = client.completions.create(model="robot", prompt=ids, logprobs=1, max_tokens=1)
    assert plain.choices[0].logprobs.tokens == lp.tokens[-1:]
    # Streamed: the same blocks, the prompt's in the first chunk.
    tokens, logprobs = [], []
    chunks = list(client.completions.create(prompt=ids, stream=True, **asked))
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
    assert tokens == lp.tokens and logprobs[0] is None
    np.testing.assert_allclose(logprobs[1:], lp.token_logprobs[1:], rtol=1e-6, atol=1e-6)
    assert len(chunks[0].choices[0].logprobs.tokens) == len(ids) + 1
    # A text prompt, logprobs=0: the prompt's tokens (BOS first), each its only alternative.
    text = client.completions.create(
        model="robot", prompt="Tell me a joke, robot.", echo=True, logprobs=0, max_tokens=2
    )
    block = text.choices[0].logprobs
    assert len(block.tokens) == len(ids) + 2
    assert block.top_logprobs[1:] == [
        {token: token_lp}
        for token, token_lp in zip(block.tokens[1:], block.token_logprobs[1:], strict=True)
    ]
    np.testing.assert_allclose(
        block.token_logprobs[1 : len(ids)], lp.token_logprobs[1 : len(ids)], atol=1e-6
    )


def test_prompt_logprobs_as_vllm(served, client):
    """vLLM's prompt_logprobs on completions (whole and streamed: with the first chunk) and
    chats: per prompt token (None for the first) its id to its logprob, rank and text, and the
    n most likely there (ranks 1..n); the logprobs are the engine's, and echo with a smaller
    logprobs keeps its own count of alternatives."""
    tokenizer = served[1].tokenizer
    ids = tokenizer.encode("Tell me a joke, robot.")
    request = served[1].engine.submit(
        ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), adapter="robot"
    )
    assert request.wait(timeout=60)
    asked = dict(model="robot", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**asked, extra_body={"prompt_logprobs": 3})
    entries = whole.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for position, (token, entry) in enumerate(zip(ids[1:], entries[1:], strict=True), 1):
        chosen = entry[str(token)]
        assert chosen["logprob"] == pytest.approx(request.prompt_logprobs[position], abs=1e-6)
        assert chosen["rank"] == request.prompt_logprob_ranks[position] >= 1
        assert chosen["decoded_token"] == tokenizer.decode([token], skip_special_tokens=False)
        # The chosen token and the 3 most likely: ranks 1..3, and the chosen one's beyond.
        extra = [chosen["rank"]] if chosen["rank"] > 3 else []
        assert sorted(e["rank"] for e in entry.values()) == [1, 2, 3, *extra]
    # echo's logprobs=1 keeps its own count: the most likely token, and the token itself.
    echoed = whole.choices[0].logprobs
    for position, top in enumerate(echoed.top_logprobs[1 : len(ids)], 1):
        assert echoed.tokens[position] in top
        assert len(top) == (1 if request.prompt_logprob_ranks[position] == 1 else 2)
    chunks = list(
        client.completions.create(**asked, stream=True, extra_body={"prompt_logprobs": 3})
    )
    streamed = [c.choices[0].model_extra.get("prompt_logprobs") for c in chunks if c.choices]
    assert streamed[0] == entries and not any(streamed[1:])
    chat = client.chat.completions.create(
        model="robot",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 0},
    )
    chat_entries = chat.model_extra["prompt_logprobs"]
    assert chat_entries[0] is None and len(chat_entries) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in chat_entries[1:])
    body = expect_error(
        400,
        lambda: client.chat.completions.create(
            model="robot",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            extra_body={"prompt_logprobs": 1},
        ),
        "only without stream",
    )
    assert body["param"] == "prompt_logprobs"


def test_bad_words_and_truncated_prompts_as_vllm(served, client):
    """vLLM's bad_words (the engine's answer to the same ban, whole and streamed) and
    truncate_prompt_tokens (the answer to the prompt's last k tokens; echo shows them; -1 keeps
    what the context holds), allowed_token_ids and skip_special_tokens; bad values are 400s
    naming the field."""
    tokenizer, engine = served[1].tokenizer, served[1].engine
    plain = client.completions.create(model="pirate", prompt="Hi", **GREEDY).choices[0].text
    assert "matey" in plain
    ids = tokenizer.encode("Hi")
    request = engine.submit(
        ids, SamplingParams(temperature=0, max_tokens=40, bad_words=("matey",)), adapter="pirate"
    )
    assert request.wait(timeout=60)
    banned = dict(model="pirate", prompt="Hi", **GREEDY, extra_body={"bad_words": ["matey"]})
    answer = client.completions.create(**banned).choices[0].text
    assert answer == request.text != plain and "matey" not in answer
    assert "".join(c.choices[0].text for c in client.completions.create(**banned, stream=True)) == (
        answer
    )
    chatted = chat(client, "pirate", extra_body={"bad_words": ["matey", "Arr"]}).choices[0]
    assert "matey" not in chatted.message.content and "Arr" not in chatted.message.content

    long_ids = tokenizer.encode("Tell me a long story about the sea, old pirate.")
    cut = dict(model="pirate", prompt="Tell me a long story about the sea, old pirate.")
    truncated = client.completions.create(
        **cut, **GREEDY, echo=True, extra_body={"truncate_prompt_tokens": 4}
    )
    assert truncated.usage.prompt_tokens == 4
    same = client.completions.create(model="pirate", prompt=long_ids[-4:], **GREEDY)
    echoed = tokenizer.decode(long_ids[-4:])
    assert truncated.choices[0].text == echoed + same.choices[0].text
    whole = client.completions.create(**cut, **GREEDY, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(long_ids)
    chat_cut = chat(client, "pirate", extra_body={"truncate_prompt_tokens": 3})
    assert chat_cut.usage.prompt_tokens == 3
    for extra, param in (
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"bad_words": ["ok", "  "]}, "bad_words"),
        ({"bad_words": "matey"}, "bad_words"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, 10**6]}, "allowed_token_ids"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ):
        body = expect_error(
            400, lambda e=extra: client.completions.create(**cut, extra_body=e), param
        )
        assert body["param"] == param, (extra, body)
    # allowed_token_ids: the engine's answer to the same list; skip_special_tokens=false
    # writes the EOS that ignore_eos went past.
    allowed = sorted(set(tokenizer.encode("Arr, the sea be wide", add_bos=False)))
    only = engine.submit(
        ids,
        SamplingParams(temperature=0, max_tokens=8, allowed_token_ids=allowed),
        adapter="pirate",
    )
    assert only.wait(timeout=60)
    listed = client.completions.create(
        model="pirate",
        prompt="Hi",
        max_tokens=8,
        temperature=0,
        extra_body={"allowed_token_ids": allowed},
    )
    assert listed.choices[0].text == only.text and set(only.output_ids) <= set(allowed)
    eos = tokenizer.eos_token_ids[0]
    written = client.completions.create(
        model="pirate",
        prompt="Hi",
        max_tokens=2,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert written.choices[0].text == 2 * tokenizer.decode([eos], skip_special_tokens=False)


def test_priorities_reach_the_engine_under_the_priority_policy(served, client, monkeypatch):
    """vLLM's priority field: each choice of a request is submitted with it once the server
    schedules by priority (the engine's own tests show the order); under "fcfs" a priority
    other than 0 is a 400."""
    engine = served[1].engine
    body = expect_error(
        400,
        lambda: client.completions.create(
            model="pirate", prompt="Hi", max_tokens=2, extra_body={"priority": -2}
        ),
        "needs the 'priority' scheduling policy",
    )
    assert body["param"] == "priority"
    seen = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        request = submit(*args, **kwargs)
        seen.append((request.request_id, request.priority))
        return request

    monkeypatch.setattr(engine, "submit", recording_submit)
    monkeypatch.setattr(
        engine,
        "engine_config",
        dataclasses.replace(engine.engine_config, scheduling_policy="priority"),
    )
    plain = client.completions.create(model="pirate", prompt="Hi", **GREEDY)
    ranked = client.completions.create(
        model="pirate", prompt="Hi", n=2, **GREEDY, extra_body={"priority": -2}
    )
    assert [c.text for c in ranked.choices] == [plain.choices[0].text] * 2
    answer = chat(client, "robot", extra_body={"priority": 7})
    assert answer.choices[0].finish_reason == "stop"
    assert [p for _, p in seen] == [0, -2, -2, 7]


def test_a_keys_priority_tier_bounds_its_requests(served, client, monkeypatch):
    """An API key's "priority" (a tier) under the priority policy: its requests run at the
    tier unless they ask for a less urgent priority; a more urgent one is raised to the tier.
    Other keys' requests keep their own; under fcfs the tier is not applied."""
    from jaxlora.server.keys import ApiKey

    state, engine = served[1], served[1].engine
    bulk_secret = "sk-bulk-0123456789abcdef"
    bulk_key = ApiKey("bulk", bulk_secret, ("*",), priority=5)
    monkeypatch.setattr(state, "config", dataclasses.replace(state.config, api_keys=(bulk_key,)))
    seen = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        request = submit(*args, **kwargs)
        seen.append(request.priority)
        return request

    monkeypatch.setattr(engine, "submit", recording_submit)
    bulk = openai.OpenAI(base_url=served[0].base_url, api_key=bulk_secret, max_retries=0)
    bulk.completions.create(model="robot", prompt="Hi", max_tokens=1)  # (fcfs: no tier)
    assert seen == [0]
    monkeypatch.setattr(
        engine,
        "engine_config",
        dataclasses.replace(engine.engine_config, scheduling_policy="priority"),
    )
    for asked in (None, -3, 9):
        extra = {} if asked is None else {"extra_body": {"priority": asked}}
        bulk.completions.create(model="robot", prompt="Hi", max_tokens=1, **extra)
    chat(client, "robot", max_tokens=1, extra_body={"priority": -3})
    assert seen[1:] == [5, 5, 9, -3]
    with pytest.raises(ConfigError, match="priority: expected an int"):
        ApiKey("x", "k", priority="high")


def test_a_keys_tokens_a_minute(served, monkeypatch):
    """max_tokens_per_minute: each generation takes its prompt and max_tokens from the key's
    bucket (the unused max_tokens come back at its end); past it, 429 with the wait in
    Retry-After; the bucket refills at the per-minute rate; a request larger than a minute's
    tokens is a 400 naming max_tokens."""
    from jaxlora.server.keys import ApiKey

    state = served[1]
    now = [1000.0]
    monkeypatch.setattr(state, "clock", lambda: now[0])
    monkeypatch.setattr(state, "_buckets", {})
    metered = ApiKey("metered", "sk-metered-0123456789abcdef", ("*",), max_tokens_per_minute=100)
    monkeypatch.setattr(state, "config", dataclasses.replace(state.config, api_keys=(metered,)))
    client = openai.OpenAI(base_url=served[0].base_url, api_key=metered.key, max_retries=0)
    prompt_tokens = len(state.tokenizer.encode("Hi"))
    full = {"model": "robot", "prompt": "Hi", "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    for _ in range(2):
        assert client.completions.create(**full).usage.completion_tokens == 40
    assert wait_until(lambda: engine_idle(state))
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(**full)
    needed = 2 * (prompt_tokens + 40) + prompt_tokens + 40 - 100  # (tokens short)
    assert int(limited.value.response.headers["retry-after"]) == math.ceil(needed * 60 / 100)
    assert "used its 100 tokens a minute" in limited.value.body["message"]
    # A generation that stops early gives its unused max_tokens back.
    now[0] += 60.0
    short = client.completions.create(model="robot", prompt="Hi", max_tokens=90, temperature=0)
    assert short.usage.completion_tokens < 90
    assert wait_until(lambda: engine_idle(state))
    assert client.completions.create(**full).usage.completion_tokens == 40
    with pytest.raises(openai.BadRequestError) as too_big:
        client.completions.create(model="robot", prompt="Hi", max_tokens=200)
    assert too_big.value.body["param"] == "max_tokens"


def test_a_request_never_admitted_gives_back_its_prompt_tokens_too(served, monkeypatch):
    """max_tokens_per_minute: a generation that ends before it was admitted (cancelled while
    waiting, or an earlier choice of an n-choice request refused part-way) gives back its whole
    reservation; one that ran keeps its prompt and its output charged."""
    from jaxlora.engine.request import FinishReason, Request, Status
    from jaxlora.server.keys import ApiKey

    state = served[1]
    now = [1000.0]
    monkeypatch.setattr(state, "clock", lambda: now[0])
    monkeypatch.setattr(state, "_buckets", {})
    metered = ApiKey("metered", "sk-metered-0123456789abcdef", ("*",), max_tokens_per_minute=100)

    def finished(request_id, *, admitted, output):
        state.reserve_tokens(metered, 20 + 40)  # its prompt and max_tokens
        request = Request(request_id, [5] * 20, SamplingParams(max_tokens=40))
        request.status, request.finish_reason = Status.FINISHED, FinishReason.ABORT
        request.admitted_time = now[0] if admitted else None
        request.output_ids = [7] * output
        state._callers[request_id] = metered.name
        state._in_flight[metered.name] += 1
        state._on_finish(request)
        return state._buckets[metered.name]

    bucket = finished("never-admitted", admitted=False, output=0)
    assert bucket.take(100) is None  # the whole minute is there again
    bucket.give_back(100)
    bucket = finished("ran", admitted=True, output=10)
    assert bucket.take(71) is not None and bucket.take(70) is None  # 20 + 10 stay charged
    assert metered.name not in state._in_flight


def test_metrics_can_need_an_admin_key(served, monkeypatch):
    """metrics_need_key (--metrics_need_key): /metrics takes an admin key (401 without one,
    403 with a tenant's); off by default; it needs keys."""
    from jaxlora.server.keys import ApiKey

    state, url = served[1], served[0].url
    assert httpx.get(f"{url}/metrics").status_code == 200
    tenant = ApiKey("acme", "sk-acme-0123456789abcdef", ("pirate",))
    monkeypatch.setattr(
        state,
        "config",
        dataclasses.replace(state.config, api_keys=(tenant,), metrics_need_key=True),
    )
    assert httpx.get(f"{url}/metrics").status_code == 401
    denied = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {tenant.key}"})
    assert denied.status_code == 403 and "may not read the metrics" in denied.text
    allowed = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert allowed.status_code == 200 and "jaxlora_requests_total" in allowed.text
    with pytest.raises(ConfigError, match="'metrics_need_key': needs API keys"):
        ServerConfig(model_name="m", metrics_need_key=True)


def test_reasoning_is_read_apart_from_the_content(served, client, monkeypatch):
    """--reasoning_parser: the message's reasoning_content and content, whole and streamed (the
    streamed parts join into the whole ones), include_reasoning=false drops it, an answer
    without the block is all content, a structured output constrains the content only (and
    all of an answer whose prompt closed the reasoning). The parser's tags
    are set to ones the pirate says ("Arr," opens, "!" ends), the way qwen3's <think> block
    opens an answer."""
    from jaxlora.server.config import ServerConfig
    from jaxlora.server.reasoning import REASONING_PARSERS, ReasoningFormat

    with pytest.raises(ConfigError, match="'reasoning_parser'"):
        ServerConfig(model_name="m", reasoning_parser="o1")
    plain = chat(client, "pirate").choices[0].message.content
    assert plain.lstrip().startswith("Arr, matey!")
    state = served[1]
    monkeypatch.setattr(
        state, "config", dataclasses.replace(state.config, reasoning_parser="qwen3")
    )
    monkeypatch.setitem(REASONING_PARSERS, "qwen3", ReasoningFormat("Arr,", "!", False))
    answer = chat(client, "pirate").choices[0].message
    assert answer.model_extra["reasoning_content"] == " matey"
    assert answer.content == plain.split("!", 1)[1]
    # The reasoning's tokens (up to the closing tag's) in the usage.
    scored = chat(client, "pirate", logprobs=True)
    tokens = [entry.token for entry in scored.choices[0].logprobs.content]
    thought = next(i + 1 for i in range(len(tokens)) if "!" in "".join(tokens[: i + 1]))
    assert scored.usage.completion_tokens_details.reasoning_tokens == thought
    # The Responses API: a reasoning item, then the message, whole and streamed.
    asked = {"model": "pirate", "input": demo.DEMO_PROMPTS[0], "temperature": 0}
    reasoned = client.responses.create(**asked, max_output_tokens=40)
    assert reasoned.usage.output_tokens_details.reasoning_tokens == thought
    assert [item.type for item in reasoned.output] == ["reasoning", "message"]
    assert reasoned.output[0].content[0].text == " matey"
    assert reasoned.output_text == answer.content
    # Logprobs: the message's are those of the tokens after the reasoning's.
    scored_response = client.responses.create(**asked, max_output_tokens=40, top_logprobs=1)
    entries = scored_response.output[1].content[0].logprobs
    assert [e.token for e in entries] == tokens[thought:]
    events = list(client.responses.create(**asked, max_output_tokens=40, stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == " matey" and events[-1].response.output_text == answer.content
    chunks = list(chat(client, "pirate", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == " matey"
    assert "".join(d.content or "" for d in deltas) == answer.content
    dropped = chat(client, "pirate", extra_body={"include_reasoning": False}).choices[0].message
    assert "reasoning_content" not in dropped.model_extra and dropped.content == answer.content
    robot = chat(client, "robot").choices[0].message
    assert robot.model_extra["reasoning_content"] is None and robot.content.startswith("BEEP")
    # A structured output constrains the content only: the grammar starts after the "!".
    yes_no = {"structured_outputs": {"choice": ["yes", "no"]}}
    constrained = chat(client, "pirate", extra_body=yes_no).choices[0].message
    assert constrained.model_extra["reasoning_content"] == " matey"
    assert constrained.content in ("yes", "no")
    chunks = list(chat(client, "pirate", stream=True, extra_body=yes_no))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == " matey"
    assert "".join(d.content or "" for d in deltas) == constrained.content
    # deepseek_r1's reading: the answer starts inside the reasoning (its opening tag, which
    # the pirate says anyway, is dropped).
    monkeypatch.setitem(REASONING_PARSERS, "qwen3", ReasoningFormat("Arr,", "!", True))
    opened = chat(client, "pirate", extra_body=yes_no).choices[0].message
    assert opened.model_extra["reasoning_content"] == " matey" and opened.content in ("yes", "no")
    # A prompt that closed the reasoning: the whole answer is content, constrained at once.
    closed_prompt = [
        {"role": "user", "content": demo.DEMO_PROMPTS[0]},
        {"role": "assistant", "content": "Arr, matey!"},
    ]
    for extra in ({}, yes_no):
        closed = (
            client.chat.completions.create(
                model="pirate",
                messages=closed_prompt,
                **GREEDY,
                extra_body={
                    "continue_final_message": True,
                    "add_generation_prompt": False,
                    **extra,
                },
            )
            .choices[0]
            .message
        )
        assert closed.model_extra["reasoning_content"] is None
        assert closed.content and (not extra or closed.content in ("yes", "no")), closed
    # A prompt that opened the reasoning (Qwen3-2507 thinking's and Qwen3.5's templates end
    # the generation prompt with <think>): qwen3 reads the answer from inside it, whole and
    # streamed (it was all content).
    monkeypatch.setitem(REASONING_PARSERS, "qwen3", ReasoningFormat("Arr,", "!", False))
    opened_prompt = [
        {"role": "user", "content": demo.DEMO_PROMPTS[0]},
        {"role": "assistant", "content": "Arr,"},
    ]
    prefilled = dict(
        model="pirate",
        messages=opened_prompt,
        **GREEDY,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    monkeypatch.setattr(state, "config", dataclasses.replace(state.config, reasoning_parser=None))
    text = client.chat.completions.create(**prefilled).choices[0].message.content
    monkeypatch.setattr(
        state, "config", dataclasses.replace(state.config, reasoning_parser="qwen3")
    )
    assert "!" in text, text
    thought, rest = text.split("!", 1)
    inside = client.chat.completions.create(**prefilled).choices[0].message
    assert inside.model_extra["reasoning_content"] == thought and inside.content == rest
    chunks = list(client.chat.completions.create(**prefilled, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == rest


def test_the_models_sampling_defaults_fill_what_a_request_leaves_unset(served, client):
    """ServerConfig.sampling_defaults (the model's generation_config.json; vLLM's
    --generation-config auto): an unset temperature, max_tokens (max_new_tokens), top_p ...
    takes the model's value, a request's own value wins; the Responses object reports the
    temperature it used."""
    state = served[1]
    url = served[0].url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt = demo.DEMO_PROMPTS[0]
    greedy = client.completions.create(model="robot", prompt=prompt, max_tokens=5, temperature=0)
    sampled = {
        client.completions.create(
            model="robot", prompt=prompt, max_tokens=5, temperature=2.0, seed=seed
        )
        .choices[0]
        .text
        for seed in range(4)
    }
    assert sampled != {greedy.choices[0].text}  # (temperature 2 strays from the greedy answer)
    original = state.config
    state.config = dataclasses.replace(
        original, sampling_defaults=(("temperature", 0.0), ("top_p", 0.5), ("max_tokens", 5))
    )
    try:
        unset = client.completions.create(model="robot", prompt=prompt)
        assert unset.choices[0].text == greedy.choices[0].text  # greedy, 5 tokens
        assert unset.usage.completion_tokens == 5
        answer = client.chat.completions.create(
            model="robot", messages=[{"role": "user", "content": prompt}]
        )
        assert answer.usage.completion_tokens == 5
        own = {
            client.completions.create(
                model="robot", prompt=prompt, max_tokens=5, temperature=2.0, top_p=1.0, seed=seed
            )
            .choices[0]
            .text
            for seed in range(4)
        }
        assert own == sampled  # the request's own temperature and top_p win
        raw = httpx.post(
            f"{url}/v1/responses", json={"model": "robot", "input": prompt}, headers=headers
        ).json()
        assert raw["temperature"] == 0.0 and raw["top_p"] == 0.5
        assert raw["usage"]["output_tokens"] == 5
    finally:
        state.config = original


def test_a_requests_own_chat_template_only_where_the_server_trusts_it(served, client):
    """chat_template in a chat or /tokenize request (vLLM's): refused (400, param chat_template)
    unless the server runs with --trust_request_chat_template; then rendered in place of the
    model's; a template jinja2 cannot parse, or that raises, is the request's 400."""
    state = served[1]
    url = served[0].url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    template = "{{ messages[-1]['content'] }} =>"
    body = {
        "model": "robot",
        "messages": [{"role": "user", "content": "hello"}],
        "chat_template": template,
        "max_tokens": 3,
        "temperature": 0,
    }
    refused = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "chat_template"
    assert "--trust_request_chat_template" in refused.json()["error"]["message"]
    original = state.config
    state.config = dataclasses.replace(original, trust_request_chat_template=True)
    try:
        tokens = httpx.post(
            f"{url}/tokenize",
            json={"messages": body["messages"], "chat_template": template},
            headers=headers,
        ).json()["tokens"]
        assert tokens == state.tokenizer.encode("hello =>")
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == len(tokens)
        for bad, message in (
            ("{% for m in messages %}", "chat_template: not a valid jinja2 template"),
            ("{{ raise_exception('no system') }}", "chat_template: no system"),
        ):
            wrong = httpx.post(
                f"{url}/v1/chat/completions", json={**body, "chat_template": bad}, headers=headers
            )
            assert wrong.status_code == 400, wrong.text
            error = wrong.json()["error"]
            assert error["param"] == "chat_template" and error["message"].startswith(message)
    finally:
        state.config = original


def test_generation_config_files_give_the_sampling_defaults(tmp_path):
    """jaxlora.formats.hf.read_generation_defaults and --generation_config (auto, none, a
    path): the fields vLLM reads, checked, naming the file and the field."""
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.errors import FormatError
    from jaxlora.formats.hf import read_generation_defaults
    from jaxlora.server.launch import generation_defaults_for

    model = tmp_path / "model"
    model.mkdir()
    assert read_generation_defaults(model) == {}
    assert generation_defaults_for("auto", str(model)) == {}
    (model / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 20,
                "repetition_penalty": 1.05,
                "max_new_tokens": 256,
                "eos_token_id": [1, 2],
            }
        )
    )
    expected = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_tokens": 256,
    }
    assert read_generation_defaults(model) == expected
    assert read_generation_defaults(model / "generation_config.json") == expected
    assert generation_defaults_for("auto", str(model)) == expected
    assert generation_defaults_for("none", str(model)) == {}
    assert generation_defaults_for(str(model), "llama-2-7b") == expected  # a preset's defaults
    assert generation_defaults_for("auto", "llama-2-7b") == {}
    with pytest.raises(ConfigError, match="--generation_config='vllm': expected auto, none"):
        generation_defaults_for("vllm", str(model))
    for field, bad in (("top_p", 0), ("temperature", -1), ("top_k", 2.5), ("max_new_tokens", 0)):
        (tmp_path / "bad.json").write_text(json.dumps({field: bad}))
        with pytest.raises(FormatError, match=rf"bad.json: field '{field}': expected"):
            read_generation_defaults(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(FormatError, match="expected a JSON object"):
        read_generation_defaults(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="'sampling_defaults': expected"):
        ServerConfig(model_name="m", sampling_defaults=(("seed", 1),))
    # jaxlora.LLM (as vLLM's): a model directory's defaults where no sampling is given.
    from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
    from jaxlora.llm import LLM
    from jaxlora.sampling import SamplingParams

    copy = tmp_path / "demo"
    shutil.copytree(demo.model_dir(), copy)
    (copy / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "max_new_tokens": 3})
    )
    small = EngineConfig(
        kv=KVCacheConfig(num_pages=32, page_size=8, max_model_len=128),
        runner=RunnerConfig(max_batch=2, max_prefill_rows=1),
        warmup=False,
    )
    llm = LLM(str(copy), engine_config=small)
    try:
        assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=3)
        [unset] = llm.generate([demo.DEMO_PROMPTS[0]])
        [greedy] = llm.generate(
            [demo.DEMO_PROMPTS[0]], sampling=SamplingParams(temperature=0.0, max_tokens=3)
        )
        assert unset.token_ids == greedy.token_ids and len(unset.token_ids) == 3
    finally:
        llm.stop()
    plain = LLM(demo.model_dir(), engine_config=small)
    assert plain.get_default_sampling_params() == SamplingParams()
    plain.stop()
    try:
        flags.FLAGS(["serve.py"])
        assert launch_flags.launch_config().generation_config == "auto"
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["serve.py", "--generation_config=none"])
        assert launch_flags.launch_config().generation_config == "none"
    finally:
        flags.FLAGS.unparse_flags()


def test_responses_answer_as_the_chat_does(served, client):
    """POST /v1/responses (OpenAI's Responses API) over the chat: the answer (validated as the
    SDK's own Response type) is the chat's with the instructions as a system message, whole
    and streamed (the events' deltas add up to it); GET returns a stored response and DELETE
    forgets it; previous_response_id continues its conversation (not its instructions);
    max_output_tokens cuts it (incomplete); store=false keeps nothing; text.format constrains
    it; bad fields are 400s naming the Responses field."""
    from openai.types.responses import Response

    url = served[0].url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt, follow_up = demo.DEMO_PROMPTS[0], demo.DEMO_PROMPTS[1]
    asked = {"model": "pirate", "temperature": 0, "max_output_tokens": 40}
    system = {"role": "system", "content": "Be brief."}
    chat_answer = client.chat.completions.create(
        model="pirate", messages=[system, {"role": "user", "content": prompt}], **GREEDY
    )
    text = chat_answer.choices[0].message.content
    raw = httpx.post(
        f"{url}/v1/responses",
        json={**asked, "instructions": "Be brief.", "input": prompt},
        headers=headers,
    ).json()
    response = Response.model_validate(raw)
    assert response.output_text == text and response.status == "completed"
    assert response.usage.input_tokens == chat_answer.usage.prompt_tokens
    assert response.usage.output_tokens == chat_answer.usage.completion_tokens
    assert client.responses.retrieve(response.id).output_text == text
    [item] = client.responses.input_items.list(response.id).data
    assert item.role == "user" and item.content[0].text == prompt

    events = list(
        client.responses.create(**asked, instructions="Be brief.", input=prompt, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    streamed = events[-1].response
    assert streamed.output_text == text and streamed.usage == response.usage
    assert client.responses.retrieve(streamed.id).output_text == text

    # Logprobs (include, top_logprobs): the chat's entries of the text's tokens, whole and
    # streamed (the deltas' add up to the done event's and the part's).
    scored_chat = client.chat.completions.create(
        model="pirate",
        messages=[{"role": "user", "content": prompt}],
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    expected = [e.model_dump() for e in scored_chat.choices[0].logprobs.content]
    scored = {**asked, "max_output_tokens": None, "input": prompt, "top_logprobs": 2}
    scored["include"] = ["message.output_text.logprobs"]
    whole = client.responses.create(**scored)
    part = whole.output[0].content[0]
    assert [e.model_dump() for e in part.logprobs] == expected
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    events = list(client.responses.create(**scored, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [x.model_dump() for e in deltas for x in e.logprobs] == expected
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [x.model_dump() for x in done.logprobs] == expected
    plain = client.responses.create(**asked, input=prompt)
    assert plain.output[0].content[0].logprobs == []

    # The conversation goes on without the instructions, as OpenAI's.
    follow = client.responses.create(**asked, previous_response_id=response.id, input=follow_up)
    follow_items = [{"role": "user", "content": follow_up}, {"role": "developer", "content": "x"}]
    third = client.responses.create(
        **{**asked, "max_output_tokens": 2}, previous_response_id=follow.id, input=follow_items
    )
    newest = client.responses.input_items.list(third.id, limit=1)
    assert newest.data[0].role == "developer" and newest.has_more
    oldest = client.responses.input_items.list(third.id, order="asc", after=newest.data[0].id)
    assert oldest.data == [] and not oldest.has_more
    first = client.responses.input_items.list(third.id, order="asc")
    assert [i.role for i in first.data] == ["user", "developer"]
    conversation = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": text},
        {"role": "user", "content": follow_up},
    ]
    again = client.chat.completions.create(model="pirate", messages=conversation, **GREEDY)
    assert follow.output_text == again.choices[0].message.content
    assert follow.usage.input_tokens == again.usage.prompt_tokens
    assert follow.previous_response_id == response.id

    short = client.responses.create(**{**asked, "max_output_tokens": 2}, input=prompt)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 2

    unstored = client.responses.create(**asked, input=prompt, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # Only background responses can be cancelled (none here); newer clients' identifiers
    # are taken and echoed.
    with pytest.raises(openai.BadRequestError, match="only background responses"):
        client.responses.cancel(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel(unstored.id)
    tagged = client.responses.create(
        **{**asked, "max_output_tokens": 1},
        input=prompt,
        safety_identifier="u-1",
        prompt_cache_key="k-1",
        store=False,
    )
    assert (tagged.safety_identifier, tagged.prompt_cache_key) == ("u-1", "k-1")
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)

    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["jolly", "grim"]}},
        "required": ["mood"],
        "additionalProperties": False,
    }
    constrained = client.responses.create(
        **asked,
        input=prompt,
        text={"format": {"type": "json_schema", "name": "mood", "schema": schema}},
    )
    assert json.loads(constrained.output_text)["mood"] in ("jolly", "grim")

    for extra, status, param in (
        ({"previous_response_id": response.id}, 404, "previous_response_id"),
        ({"background": True}, 400, "background"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            400,
            "input[0].content[0].type",
        ),
        ({"max_output_tokens": 10**6}, 400, "max_output_tokens"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": []}}},
            400,
            "text.format",
        ),
        ({"model": "nobody"}, 404, "model"),
        ({"tools": [{"type": "function", "name": "f"}]}, 400, "tools"),
        ({"seed": 3}, 400, "seed"),
    ):
        answer = httpx.post(
            f"{url}/v1/responses", json={**asked, "input": prompt, **extra}, headers=headers
        )
        assert answer.status_code == status, (extra, answer.text)
        assert answer.json()["error"]["param"] == param, (extra, answer.text)
    gone = httpx.get(f"{url}/v1/responses/resp_nothing", headers=headers)
    assert gone.status_code == 404 and "resp_nothing" in gone.json()["error"]["message"]


def test_a_batch_file_gets_every_answer_in_input_order(served, client):
    """jaxlora.server.batch (OpenAI's batch format, vLLM's run_batch): chats, completions and
    responses for two adapters and the base model, three at a time, come back in the input's
    order with the server's answers; lines that are not requests and requests the server
    refuses get their error without stopping the batch."""
    from jaxlora.server.batch import run_batch

    prompt = demo.DEMO_PROMPTS[0]

    def line(custom_id, url, body, **extra):
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}
        )

    chat_body = {"model": "pirate", "messages": [{"role": "user", "content": prompt}], **GREEDY}
    lines = [
        line("chat", "/v1/chat/completions", chat_body),
        line("completion", "/v1/completions", {"model": "robot", "prompt": "Hi", **GREEDY}),
        line("response", "/v1/responses", {"model": BASE, "input": prompt, "temperature": 0}),
        "   ",
        "{not json",
        line("embed", "/v1/embeddings", {"model": "robot", "input": "Hi"}),
        line("get", "/v1/completions", {"model": "robot", "prompt": "Hi"}, method="GET"),
        line("streamed", "/v1/completions", {"model": "robot", "prompt": "Hi", "stream": True}),
        line("nobody", "/v1/completions", {"model": "nobody", "prompt": "Hi"}),
        line("cold", "/v1/completions", {"model": "robot", "prompt": "Hi", "temperature": -1}),
    ]
    out = []
    counts = run_batch(served[0].url, lines, out.append, api_key=API_KEY, max_concurrency=3)
    answers = [json.loads(text) for text in out]
    assert [a["custom_id"] for a in answers] == [
        "chat",
        "completion",
        "response",
        None,
        "embed",
        "get",
        "streamed",
        "nobody",
        "cold",
    ]
    assert [a["response"]["status_code"] for a in answers] == [200] * 3 + [400] * 4 + [404, 400]
    assert counts.requests == 9 and counts.failed == 6
    assert all(a["error"] is None for a in answers[:3])
    bodies = [a["response"]["body"] for a in answers]
    assert bodies[0]["choices"][0]["message"]["content"] == (
        chat(client, "pirate").choices[0].message.content
    )
    assert bodies[1]["choices"][0]["text"] == (
        client.completions.create(model="robot", prompt="Hi", **GREEDY).choices[0].text
    )
    assert bodies[2]["output"][0]["content"][0]["text"] == (
        client.responses.create(model=BASE, input=prompt, temperature=0).output_text
    )
    assert answers[0]["response"]["request_id"] == bodies[0]["id"]
    assert "not JSON" in answers[3]["error"]["message"]
    assert "url: expected one of" in answers[4]["error"]["message"]
    assert "method: expected 'POST'" in answers[5]["error"]["message"]
    assert "not streamed" in answers[6]["error"]["message"]
    assert answers[7]["error"]["code"] == "model_not_found"
    assert bodies[8]["error"]["param"] == "temperature"
    assert "line 5: not JSON" in answers[3]["error"]["message"]  # (the blank line 4 counts)

    # The input streams: at most max_ahead lines are read beyond the last answer written, and a
    # line that is not UTF-8 is an error of its own.
    read = []

    def source():
        for i in range(12):
            read.append(i)
            if i == 5:
                yield b"\xc3(\n"
            else:
                body = {"model": "robot", "prompt": f"Hi {i}", "max_tokens": 2 + i % 3}
                yield line(f"r{i}", "/v1/completions", body).encode()

    written = []

    def write(text):
        assert len(read) - len(written) <= 4, (len(read), len(written))
        written.append(json.loads(text))

    counts = run_batch(
        served[0].url, source(), write, api_key=API_KEY, max_concurrency=2, max_ahead=4
    )
    assert (counts.requests, counts.failed) == (12, 1) and len(written) == 12
    assert [a["custom_id"] for a in written] == [f"r{i}" if i != 5 else None for i in range(12)]
    assert "line 6: not UTF-8 text" in written[5]["error"]["message"]
    # A write that fails (a full disk) stops the batch with its error, nothing read after.
    read.clear()

    def full_disk(text):
        if json.loads(text)["custom_id"] == "r2":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        run_batch(served[0].url, source(), full_disk, api_key=API_KEY, max_ahead=2)
    assert len(read) <= 4
    with pytest.raises(ConfigError, match="max_ahead: expected an int >= 1"):
        run_batch(served[0].url, [], write, max_ahead=0)


def test_chat_continues_a_prefilled_answer_as_vllm(served, client):
    """vLLM's continue_final_message (the prompt ends inside the assistant's prefilled text:
    the completion of those ids), echo (the answer starts with that text, whole and
    streamed), add_generation_prompt=false, chat_template_kwargs (given to the template;
    a variable the server sets is refused), and /tokenize with the same fields."""
    url, tokenizer = served[0].url, served[1].tokenizer
    prefilled = [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Arr, here be"},
    ]
    go_on = {"continue_final_message": True}
    answer = client.chat.completions.create(
        model="pirate", messages=prefilled, **GREEDY, extra_body=go_on
    )
    ids = tokenizer.encode_chat(prefilled, continue_final_message=True)
    assert tokenizer.decode(ids).endswith("Arr, here be")
    assert answer.usage.prompt_tokens == len(ids)
    completion = client.completions.create(model="pirate", prompt=ids, **GREEDY)
    assert answer.choices[0].message.content == completion.choices[0].text
    echo = {**go_on, "echo": True}
    echoed = client.chat.completions.create(
        model="pirate", messages=prefilled, **GREEDY, extra_body=echo
    )
    assert echoed.choices[0].message.content == "Arr, here be" + completion.choices[0].text
    chunks = client.chat.completions.create(
        model="pirate", messages=prefilled, **GREEDY, stream=True, extra_body=echo
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == echoed.choices[0].message.content
    # The prefilled answer as text parts: joined by newlines in the prompt and in the echo.
    parts = [{"type": "text", "text": "Arr,"}, {"type": "text", "text": "here be"}]
    in_parts = client.chat.completions.create(
        model="pirate",
        messages=[prefilled[0], {**prefilled[1], "content": parts}],
        **GREEDY,
        extra_body=echo,
    )
    as_one = [prefilled[0], {**prefilled[1], "content": "Arr,\nhere be"}]
    continued = client.completions.create(
        model="pirate", prompt=tokenizer.encode_chat(as_one, continue_final_message=True), **GREEDY
    )
    assert in_parts.choices[0].message.content == "Arr,\nhere be" + continued.choices[0].text
    # echo after a user message adds nothing.
    assert (
        chat(client, "pirate", extra_body={"echo": True}).choices[0].message.content
        == chat(client, "pirate").choices[0].message.content
    )
    no_header = client.chat.completions.create(
        model="pirate",
        messages=prefilled[:1],
        max_tokens=1,
        extra_body={"add_generation_prompt": False},
    )
    assert no_header.usage.prompt_tokens == len(
        tokenizer.encode_chat(prefilled[:1], add_generation_prompt=False)
    )
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokenized = httpx.post(
        f"{url}/tokenize", json={"messages": prefilled, **go_on}, headers=headers
    ).json()
    assert tokenized["tokens"] == ids
    for extra, param in (
        ({**go_on, "add_generation_prompt": True}, "continue_final_message"),
        (
            {"chat_template_kwargs": {"add_generation_prompt": True}},
            "chat_template_kwargs.add_generation_prompt",
        ),
        ({"chat_template_kwargs": ["think"]}, "chat_template_kwargs"),
    ):
        body = expect_error(
            400,
            lambda e=extra: client.chat.completions.create(
                model="pirate", messages=prefilled, max_tokens=2, extra_body=e
            ),
            param,
        )
        assert body["param"] == param, (extra, body)
    empty_final = [prefilled[0], {"role": "assistant", "content": ""}]
    body = expect_error(
        400,
        lambda: client.chat.completions.create(
            model="pirate", messages=empty_final, max_tokens=2, extra_body=go_on
        ),
        "continue_final_message needs a final message with text",
    )
    assert body["param"] == "messages[1].content"
    # A template that reads a request variable.
    state = served[1]
    old = state.tokenizer.chat_template
    state.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% if brief %}Briefly: {% endif %}"
        "{% if reasoning_effort %}Effort {{ reasoning_effort }}: {% endif %}{% endif %}"
    )
    try:
        plain = httpx.post(
            f"{url}/tokenize", json={"messages": prefilled[:1]}, headers=headers
        ).json()
        brief = httpx.post(
            f"{url}/tokenize",
            json={"messages": prefilled[:1], "chat_template_kwargs": {"brief": True}},
            headers=headers,
        ).json()
        assert brief["tokens"][: plain["count"]] == plain["tokens"]
        assert tokenizer.decode(brief["tokens"][plain["count"] :]).strip() == "Briefly:"
        briefly = client.chat.completions.create(
            model="pirate",
            messages=prefilled[:1],
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"brief": True}},
        )
        assert briefly.usage.prompt_tokens == brief["count"]
        # OpenAI's reasoning_effort reaches the template as reasoning_effort; given twice or
        # with a value OpenAI does not take, a 400 naming it.
        effort = client.chat.completions.create(
            model="pirate", messages=prefilled[:1], max_tokens=2, reasoning_effort="low"
        )
        expected = tokenizer.encode_chat(prefilled[:1], template_kwargs={"reasoning_effort": "low"})
        assert effort.usage.prompt_tokens == len(expected) > plain["count"]
        assert "Effort low:" in tokenizer.decode(expected)
        for extra in (
            {"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "high"}},
            {"reasoning_effort": "ultra"},
        ):
            body = expect_error(
                400,
                lambda e=extra: client.chat.completions.create(
                    model="pirate", messages=prefilled[:1], max_tokens=2, extra_body=e
                ),
            )
            assert body["param"] == "reasoning_effort", body
        # (identifiers OpenAI's clients send are taken; service_tier only as a self-hosted
        # server honours it)
        client.chat.completions.create(
            model="pirate",
            messages=prefilled[:1],
            max_tokens=1,
            extra_body={"safety_identifier": "u1", "prompt_cache_key": "k", "service_tier": "auto"},
        )
        body = expect_error(
            400,
            lambda: client.completions.create(
                model="pirate", prompt="Hi", max_tokens=1, extra_body={"service_tier": "flex"}
            ),
        )
        assert body["param"] == "service_tier"
    finally:
        state.tokenizer.chat_template = old


def test_tokenize_and_detokenize_as_vllm(served, client):
    """POST /tokenize gives the ids a completion's prompt or a chat's messages feed the model
    (the chat's prompt_tokens), /detokenize their text; bad bodies get 4xx naming the field."""
    url, tokenizer = served[0].url, served[1].tokenizer
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(route, body, key=True):
        return httpx.post(f"{url}{route}", json=body, headers=headers if key else {})

    text = "Tell me a joke."
    out = post("/tokenize", {"model": "pirate", "prompt": text}).json()
    assert out["tokens"] == tokenizer.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == served[1].max_model_len
    bare = post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode(text, add_bos=False)
    assert bare["count"] == out["count"] - 1
    messages = [{"role": "user", "content": text}]
    chatted = post("/tokenize", {"model": "robot", "messages": messages}).json()
    answer = client.chat.completions.create(model="robot", messages=messages, max_tokens=1)
    assert chatted["count"] == answer.usage.prompt_tokens
    back = post("/detokenize", {"model": BASE, "tokens": out["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(out["tokens"])} and text in back["prompt"]
    for route, body, status, param in (
        ("/tokenize", {"prompt": text, "messages": messages}, 400, "messages"),
        ("/tokenize", {"model": "pirate"}, 400, "prompt"),
        ("/tokenize", {"model": "nobody", "prompt": text}, 404, "model"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/detokenize", {"tokens": [1, 70000]}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
        ("/detokenize", {"model": "nobody", "tokens": [1]}, 404, "model"),
    ):
        response = post(route, body)
        assert response.status_code == status, (route, body, response.text)
        assert response.json()["error"]["param"] == param, (route, body, response.text)
    assert post("/tokenize", {"prompt": text}, key=False).status_code == 401


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def test_tools_without_a_parser_or_a_template_are_refused_naming_the_field(client):
    """The demo server reads no tool calls back and its default chat template renders no
    tools: 400s that say so, for a forced call (constrained decoding) too; a forced call of a
    function that is not offered is refused naming tool_choice."""
    body = expect_error(
        400, lambda: chat(client, "pirate", tools=[WEATHER_TOOL]), "tool_call_parser"
    )
    assert body["param"] == "tools"
    body = expect_error(
        400,
        lambda: chat(client, "pirate", tools=[WEATHER_TOOL], tool_choice="none"),
        "default chat template cannot render tools",
    )
    assert body["param"] == "tools"
    body = expect_error(
        400,
        lambda: chat(client, "pirate", tools=[WEATHER_TOOL], tool_choice="required"),
        "default chat template cannot render tools",
    )
    assert body["param"] == "tools"
    named = {"type": "function", "function": {"name": "get_time"}}
    body = expect_error(
        400,
        lambda: chat(client, "pirate", tools=[WEATHER_TOOL], tool_choice=named),
        "'get_time' is not among the tools (['get_weather'])",
    )
    assert body["param"] == "tool_choice"
    body = expect_error(400, lambda: chat(client, "pirate", tools=[{"type": "x"}]), "tools[0]")
    assert body["param"] == "tools[0]"


def test_enable_auto_tool_choice_takes_vllms_command_line_and_off_refuses_auto(served, client):
    """vLLM's --enable-auto-tool-choice --tool-call-parser hermes carries over; the flag without
    a parser is refused at launch, naming both; --noenable_auto_tool_choice refuses chats whose
    tools would be called at the model's choice (400 naming the flag and the param), and no
    other tool_choice."""
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.server.launch import check_tool_flags

    launches = {}
    try:
        for argv in (
            ["serve.py", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            ["serve.py", "--enable-auto-tool-choice"],
            ["serve.py", "--no-enable-auto-tool-choice"],
            ["serve.py"],
        ):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(launch_flags.vllm_spelling(argv))
            launches[" ".join(argv[1:])] = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    vllm = launches["--enable-auto-tool-choice --tool-call-parser hermes"]
    assert (vllm.enable_auto_tool_choice, vllm.tool_call_parser) == (True, "hermes")
    check_tool_flags(vllm)
    with pytest.raises(ConfigError, match="--enable_auto_tool_choice: .* no --tool_call_parser"):
        check_tool_flags(launches["--enable-auto-tool-choice"])
    assert launches["--no-enable-auto-tool-choice"].enable_auto_tool_choice is False
    assert launches[""].enable_auto_tool_choice is None

    state = served[1]
    config = state.config
    state.config = dataclasses.replace(config, tool_call_parser="hermes", auto_tool_choice=False)
    try:
        for choice in (None, "auto"):
            extra = {} if choice is None else {"tool_choice": choice}
            body = expect_error(
                400,
                lambda extra=extra: chat(client, "pirate", tools=[WEATHER_TOOL], **extra),
                "--enable_auto_tool_choice",
            )
            assert body["param"] == "tool_choice"
        # (tool_choice "none" passes the flag's gate: this demo's template then cannot
        # render tools, which the test below serves with one that can)
        body = expect_error(
            400,
            lambda: chat(client, "pirate", tools=[WEATHER_TOOL], tool_choice="none"),
            "chat template cannot render tools",
        )
        assert "--enable_auto_tool_choice" not in body["message"]
    finally:
        state.config = config


def test_tool_calls_are_read_back_with_the_parser(monkeypatch):
    """A server with --tool_call_parser=hermes and a chat template that renders tools: the
    template gets the tools (more prompt tokens); an answer without a call is plain content,
    whole and streamed; an answer the parser reads as calls (here the parser is told the
    pirate's answer is one) comes back as tool_calls with finish reason "tool_calls", whole
    and streamed (a tool_calls delta before the finish)."""
    from jaxlora.server import app as app_module
    from jaxlora.server.tool_calls import ToolCall, ToolCallStream

    server, state = start_demo_server(tool_call_parser="hermes")
    state.tokenizer.chat_template = (
        "{% if tools %}Tools: {% for t in tools %}{{ t['function']['name'] }}{% endfor %}\n"
        "{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        plain = chat(client, "pirate")
        offered = chat(client, "pirate", tools=[WEATHER_TOOL])
        assert offered.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools rendered
        assert offered.choices[0].message.content == plain.choices[0].message.content
        assert offered.choices[0].message.tool_calls is None
        assert offered.choices[0].finish_reason == "stop"
        streamed = list(chat(client, "pirate", tools=[WEATHER_TOOL], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == plain.choices[0].message.content

        answer = plain.choices[0].message.content

        def as_call(text, parser):
            return (
                ("", [ToolCall("get_weather", '{"city": "Paris"}')])
                if text == answer
                else (
                    text,
                    [],
                )
            )

        class AllACall(ToolCallStream):
            def push(self, delta):
                self._held += delta
                return ""

            def finish(self):
                return "", as_call(self._held, "hermes")[1]

        monkeypatch.setattr(app_module, "parse_tool_calls", as_call)
        monkeypatch.setattr(app_module, "ToolCallStream", AllACall)
        called = chat(client, "pirate", tools=[WEATHER_TOOL])
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        [call] = choice.message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
        chunks = list(chat(client, "pirate", tools=[WEATHER_TOOL], stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        [with_calls] = [d for d in deltas if d.tool_calls]
        assert with_calls.tool_calls[0].function.name == "get_weather"
        assert with_calls.tool_calls[0].index == 0 and with_calls.tool_calls[0].id
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # parallel_tool_calls: false keeps the first call the parser reads (vLLM's reading).
        def two_calls(text, parser):
            content, calls = as_call(text, parser)
            return content, calls + [ToolCall("get_time", '{"zone": "UTC"}')] if calls else []

        class TwoCalls(AllACall):
            def finish(self):
                return "", two_calls(self._held, "hermes")[1]

        monkeypatch.setattr(app_module, "parse_tool_calls", two_calls)
        monkeypatch.setattr(app_module, "ToolCallStream", TwoCalls)
        both = chat(client, "pirate", tools=[WEATHER_TOOL]).choices[0].message.tool_calls
        assert [c.function.name for c in both] == ["get_weather", "get_time"]
        for stream in (False, True):
            reply = chat(
                client, "pirate", tools=[WEATHER_TOOL], parallel_tool_calls=False, stream=stream
            )
            if stream:
                [calls] = [
                    c.choices[0].delta.tool_calls
                    for c in reply
                    if c.choices and c.choices[0].delta.tool_calls
                ]
            else:
                calls = reply.choices[0].message.tool_calls
            assert [c.function.name for c in calls] == ["get_weather"], stream
    finally:
        server.stop()


SEA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["calm", "stormy"]},
        "waves": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["mood", "waves"],
    "additionalProperties": False,
    # (the demo model would pad free-whitespace JSON with blanks)
    "x-guidance": {"whitespace_flexible": False},
}


def test_structured_outputs_constrain_the_answers(served, client):
    """response_format json_schema and json_object (OpenAI's), structured_outputs and the
    guided_* fields (vLLM's), on chats and completions, greedy and sampled, whole and streamed:
    every answer is what its constraint admits, and the streamed text is the whole one."""
    free = chat(client, "pirate").choices[0].message.content
    sea = {"type": "json_schema", "json_schema": {"name": "sea", "schema": SEA}}
    whole = chat(client, "pirate", response_format=sea).choices[0]
    value = json.loads(whole.message.content)
    assert whole.finish_reason == "stop" and value["mood"] in ("calm", "stormy")
    assert 0 <= value["waves"] <= 9 and set(value) == {"mood", "waves"}
    assert whole.message.content != free
    streamed = list(chat(client, "pirate", response_format=sea, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.message.content

    compact_object = {"json_object": True, "disable_any_whitespace": True}
    answer = chat(client, "pirate", extra_body={"structured_outputs": compact_object}).choices[0]
    assert answer.finish_reason == "stop"
    assert isinstance(json.loads(answer.message.content), dict)

    choices = ["aye", "nay", "belay that"]
    sampled = client.completions.create(
        model="pirate",
        prompt="Ahoy",
        max_tokens=20,
        temperature=1.5,
        n=8,
        seed=3,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in sampled.choices)
    assert len({c.text for c in sampled.choices}) > 1
    for field, spec, pattern in (
        ("guided_regex", "[0-9]{2}-[a-z]{3}", r"[0-9]{2}-[a-z]{3}"),
        ("guided_choice", ["left", "right"], r"left|right"),
        ("guided_grammar", 'start: "(" D ("+" D)* ")"\nD: /[0-9]/', r"\([0-9](\+[0-9])*\)"),
    ):
        out = client.completions.create(
            model="robot", prompt="Go", max_tokens=24, temperature=0, extra_body={field: spec}
        )
        assert re.fullmatch(pattern, out.choices[0].text), (field, out.choices[0].text)
    body = expect_error(
        400,
        lambda: chat(client, "pirate", response_format=sea, extra_body={"guided_regex": "a"}),
        "response_format, guided_regex: expected at most one constraint",
    )
    assert body["param"] == "guided_regex"


def test_forced_tool_calls_are_decoded_under_the_tools_schemas():
    """tool_choice a named function: the answer is that function's arguments (its parameters'
    schema), finish reason "stop" as OpenAI's, streamed as they come (the first delta with the
    call's id and name); tool_choice "required": one or more calls of offered tools, finish
    reason "tool_calls", whole and streamed (one tool_calls delta)."""
    server, state = start_demo_server()
    state.tokenizer.chat_template = (
        "{% if tools %}Tools: {% for t in tools %}{{ t['function']['name'] }}{% endfor %}\n"
        "{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    }
    tools = [weather, clock]
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        named = {"type": "function", "function": {"name": "get_time"}}
        for model in ("pirate", "robot"):
            choice = chat(client, model, tools=tools, tool_choice=named).choices[0]
            assert choice.finish_reason == "stop" and choice.message.content is None
            [call] = choice.message.tool_calls
            assert call.function.name == "get_time"
            assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
            chunks = list(chat(client, model, tools=tools, tool_choice=named, stream=True))
            pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
            pieces = [p[0] for p in pieces if p]
            assert len(pieces) > 1 and pieces[0].id and pieces[0].function.name == "get_time"
            assert all(p.index == 0 and not p.id for p in pieces[1:])
            assert "".join(p.function.arguments for p in pieces) == call.function.arguments
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            # Cut short by max_tokens: the call with the arguments so far, finish "length",
            # whole as streamed (it was content, and the stream a call).
            cut = chat(client, model, tools=tools, tool_choice=named, max_tokens=3).choices[0]
            assert cut.finish_reason == "length" and cut.message.content is None
            [part] = cut.message.tool_calls
            assert part.function.name == "get_time"
            assert call.function.arguments.startswith(part.function.arguments)
            assert part.function.arguments != call.function.arguments
            chunks = list(
                chat(client, model, tools=tools, tool_choice=named, max_tokens=3, stream=True)
            )
            pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
            streamed = "".join(p[0].function.arguments for p in pieces if p)
            assert streamed.strip() == part.function.arguments
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        whole = chat(client, "pirate", tools=tools, tool_choice="required", max_tokens=80)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_time":
                assert arguments["zone"] in ("UTC", "CET")
            else:
                assert call.function.name == "get_weather" and len(arguments["city"]) <= 8
        chunks = list(
            chat(client, "pirate", tools=tools, tool_choice="required", max_tokens=80, stream=True)
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        [with_calls] = [d for d in deltas if d.tool_calls]
        assert [(c.function.name, c.function.arguments) for c in with_calls.tool_calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]
        assert not "".join(d.content or "" for d in deltas)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        # parallel_tool_calls: false: the schema admits one call (sampled answers too).
        single = chat(
            client,
            "pirate",
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=1.0,
            n=4,
            seed=3,
        )
        calls = [c.message.tool_calls for c in single.choices if c.finish_reason == "tool_calls"]
        assert calls and all(len(c) == 1 for c in calls)
        # The Responses API: a forced call is a function_call item (whole and streamed), and
        # its output, sent back as a function_call_output item, continues the conversation.
        flat = [{"type": "function", "name": t["function"]["name"], **t["function"]} for t in tools]
        asked = {"model": "pirate", "input": demo.DEMO_PROMPTS[0], "temperature": 0}
        forced = {"tools": flat, "tool_choice": {"type": "function", "name": "get_time"}}
        called = client.responses.create(**asked, **forced, max_output_tokens=40)
        [item] = called.output
        assert item.type == "function_call" and item.name == "get_time"
        assert json.loads(item.arguments)["zone"] in ("UTC", "CET")
        events = list(client.responses.create(**asked, **forced, max_output_tokens=40, stream=True))
        pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert len(pieces) > 1 and "".join(pieces) == item.arguments
        cut = client.responses.create(**asked, **forced, max_output_tokens=3)
        assert cut.status == "incomplete"
        [part] = cut.output
        assert part.type == "function_call" and item.arguments.startswith(part.arguments)
        result = {"type": "function_call_output", "call_id": item.call_id, "output": "12:00"}
        answered = client.responses.create(
            model="pirate",
            previous_response_id=called.id,
            input=[result],
            tools=flat,
            tool_choice="none",  # (this server reads no calls back from free answers)
            temperature=0,
            max_output_tokens=8,
        )
        assert answered.output[0].type == "message"
        call = {
            "id": item.call_id,
            "type": "function",
            "function": {"name": "get_time", "arguments": item.arguments},
        }
        conversation = [
            {"role": "user", "content": demo.DEMO_PROMPTS[0]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": item.call_id, "content": "12:00"},
        ]
        assert answered.usage.input_tokens == len(
            state.tokenizer.encode_chat(conversation, tools=tools)
        )
        # The mistral parser keeps special tokens in the answer's text (its [TOOL_CALLS] is
        # one); the EOS that ends it is still not text. An answer with no call is content.
        state.config = dataclasses.replace(state.config, tool_call_parser="mistral")
        kept, submit = [], state.engine.submit

        def recording_submit(prompt_ids, sampling, *args, **kwargs):
            kept.append(sampling.skip_special_tokens)
            return submit(prompt_ids, sampling, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(state.engine, "submit", recording_submit)
            auto = chat(client, "pirate", tools=tools).choices[0]
            plain = chat(client, "pirate", tools=tools, tool_choice="none").choices[0]
        assert kept == [False, True]
        assert auto.finish_reason == "stop" and not auto.message.tool_calls
        assert (
            auto.message.content == plain.message.content and "<eos>" not in plain.message.content
        )
        # Beside a reasoning parser the call is decoded after the reasoning (the pirate's
        # "Arr, matey!" as a qwen3 block), whole and streamed.
        from jaxlora.server.reasoning import REASONING_PARSERS, ReasoningFormat

        state.config = dataclasses.replace(state.config, reasoning_parser="qwen3")
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(REASONING_PARSERS, "qwen3", ReasoningFormat("Arr,", "!", False))
            message = chat(client, "pirate", tools=tools, tool_choice=named).choices[0].message
            assert message.model_extra["reasoning_content"] == " matey"
            [call] = message.tool_calls
            assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
            chunks = list(chat(client, "pirate", tools=tools, tool_choice=named, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            thought = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
            arguments = "".join(d.tool_calls[0].function.arguments for d in deltas if d.tool_calls)
            assert thought == " matey" and arguments == call.function.arguments
    finally:
        server.stop()


def test_finished_requests_are_logged_when_asked(served, client, caplog, monkeypatch):
    """log_requests (--log_requests): one INFO line a finished request, with its id, model,
    token counts, finish reason and times; nothing without it."""
    state = served[1]

    def logged():
        return [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("request cmpl-")
        ]

    with caplog.at_level(logging.INFO, logger="jaxlora.server"):
        client.completions.create(model="robot", prompt="Hi", **GREEDY)
        time.sleep(0.2)
        assert logged() == []
        monkeypatch.setattr(state, "config", dataclasses.replace(state.config, log_requests=True))
        answer = client.completions.create(model="robot", prompt="Hi", n=2, **GREEDY)
        deadline = time.monotonic() + 10
        while len(logged()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = sorted(logged())
    assert len(lines) == 2, lines
    for choice, line in enumerate(lines):
        assert re.fullmatch(
            rf"request {answer.id}-0-{choice} model=robot key=api_key prompt_tokens=\d+ "
            rf"output_tokens={answer.usage.completion_tokens // 2} finish=stop "
            r"ttft=\d+\.\d{3}s e2e=\d+\.\d{3}s preemptions=0",
            line,
        ), line


def test_openapi_health_and_no_key_needed_outside_v1(served):
    url = served[0].url
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/responses",
        "/v1/responses/{response_id}/input_items",
        "/health",
        "/metrics",
    ):
        assert path in schema["paths"], path
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/metrics").status_code == 200
    # X-Request-Id: the client's own (a gateway's) comes back; otherwise a new one, and one
    # that could inject a header is replaced.
    given = httpx.get(f"{url}/health", headers={"X-Request-Id": "gw-123.a:b@c"})
    assert given.headers["x-request-id"] == "gw-123.a:b@c"
    fresh = [httpx.get(f"{url}/health").headers["x-request-id"] for _ in range(2)]
    assert len(set(fresh)) == 2 and all(re.fullmatch("[0-9a-f]{32}", f) for f in fresh)
    odd = httpx.get(f"{url}/health", headers={"X-Request-Id": "a b"}).headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", odd)
    unauthorized = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "r1"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "r1"
    # vLLM's /version and /reset_prefix_cache (behind the key; prefix caching is off here).
    assert httpx.get(f"{url}/version").json() == {"version": jaxlora.__version__}
    assert httpx.post(f"{url}/reset_prefix_cache").status_code == 401
    reset = httpx.post(f"{url}/reset_prefix_cache", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reset.json() == {"reset": True, "pages_dropped": 0}


def test_sagemaker_ping_and_invocations_route_by_the_body(served, client):
    """/ping answers as /health; /invocations answers a chat, a completion or a response (by
    the body's messages, prompt or input) as its /v1 route does, streamed too; bodies of none
    of these, bad JSON and bad fields are 400s naming the field; it takes the API key."""
    url = served[0].url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/ping").json() == httpx.post(f"{url}/ping").json() == {"status": "ok"}

    def invoke(body, **kw):
        return httpx.post(f"{url}/invocations", json=body, headers=headers, timeout=60, **kw)

    messages = [{"role": "user", "content": demo.DEMO_PROMPTS[0]}]
    chat_answer = invoke({"model": "pirate", "messages": messages, **GREEDY}).json()
    assert chat_answer["object"] == "chat.completion"
    assert chat_answer["choices"][0]["message"]["content"] == (
        chat(client, "pirate").choices[0].message.content
    )
    completion = invoke({"model": "robot", "prompt": "Hi", **GREEDY}).json()
    assert completion["choices"][0]["text"] == (
        client.completions.create(model="robot", prompt="Hi", **GREEDY).choices[0].text
    )
    response = invoke({"model": "poet", "input": "Hi", "temperature": 0}).json()
    assert response["object"] == "response" and response["output"][0]["content"][0]["text"] == (
        client.responses.create(model="poet", input="Hi", temperature=0).output_text
    )
    streamed = invoke({"model": "pirate", "messages": messages, "stream": True, **GREEDY})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    pieces = [
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(pieces) == chat_answer["choices"][0]["message"]["content"]
    for body, param in (
        ({"model": "pirate", "question": "Hi"}, "body"),
        ([1, 2], "body"),
        ({"model": "robot", "prompt": 5}, "prompt"),
        ({"model": "robot", "messages": [], "prompt": "Hi"}, "prompt"),  # (a chat: unknown)
    ):
        answer = invoke(body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, body
    bad_json = httpx.post(f"{url}/invocations", content=b"{oops", headers=headers)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] == "body"
    assert httpx.post(f"{url}/invocations", json={"prompt": "Hi"}).status_code == 401


# ---------------------------------------------------------------------------- errors


def expect_error(status: int, call, *needles):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value
    assert error.status_code == status, error
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message", str(error))
    for needle in needles:
        assert needle in message, message
    return body


# What lorax-client sends when only the prompt and an adapter are given: every parameter at its
# default (its Parameters model's dict).
LORAX_CLIENT_PARAMETERS = {
    "adapter_id": None,
    "adapter_source": None,
    "merged_adapters": None,
    "api_token": None,
    "do_sample": False,
    "max_new_tokens": None,
    "ignore_eos_token": False,
    "repetition_penalty": None,
    "return_full_text": False,
    "stop": [],
    "seed": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "truncate": None,
    "typical_p": None,
    "best_of": None,
    "watermark": False,
    "details": True,
    "decoder_input_details": False,
    "return_k_alternatives": None,
    "response_format": None,
}


def _lorax_post(served, route, inputs, stream=False, **parameters):
    body = {"inputs": inputs, "parameters": {**LORAX_CLIENT_PARAMETERS, **parameters}}
    if stream:
        body["stream"] = True
    return httpx.post(
        served[0].base_url.removesuffix("/v1") + route,
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )


def _lorax_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: {") for line in lines), lines  # (no [DONE], as LoRAX's)
    return [json.loads(line[len("data: ") :]) for line in lines]


def test_lorax_generate_answers_as_the_completion_with_lorax_details(served, client):
    """POST /generate (LoRAX's and TGI's API; lorax-client sends every parameter): the greedy
    text, token ids and logprobs of the same /v1/completions request, with LoRAX's details:
    finish reasons eos_token / length / stop_sequence, token counts, each token's id, text,
    logprob and special flag (the EOS's text written, flagged special), the prompt's tokens
    with decoder_input_details, alternatives with return_k_alternatives; return_full_text
    prepends the prompt; without details, none."""
    tokenizer = served[1].tokenizer
    reference = client.completions.create(
        model="robot",
        prompt="Hi",
        logprobs=2,
        **GREEDY,
        extra_body={"return_token_ids": True},
    )
    choice = reference.choices[0]
    answer = _lorax_post(served, "/generate", "Hi", adapter_id="robot", max_new_tokens=40)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["generated_text"] == choice.text
    details = body["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["prompt_tokens"] == reference.usage.prompt_tokens
    assert details["generated_tokens"] == reference.usage.completion_tokens
    assert (details["skipped_tokens"], details["prefill"], details["best_of_sequences"]) == (
        0,
        [],
        None,
    )
    tokens = details["tokens"]
    assert [t["id"] for t in tokens] == choice.model_extra["token_ids"]
    np.testing.assert_allclose(
        [t["logprob"] for t in tokens], choice.logprobs.token_logprobs, atol=1e-5
    )
    assert [t["special"] for t in tokens] == [False] * (len(tokens) - 1) + [True]
    assert tokens[-1]["text"] == tokenizer.decode([tokens[-1]["id"]], skip_special_tokens=False)
    assert "".join(t["text"] for t in tokens if not t["special"]) == body["generated_text"]
    assert all(t["skipped"] is False and "alternative_tokens" not in t for t in tokens)

    plain = _lorax_post(
        served, "/generate", "Hi", adapter_id="robot", max_new_tokens=40, details=False
    ).json()
    assert plain == {"generated_text": choice.text, "details": None}
    default = _lorax_post(served, "/generate", "Hi", adapter_id="robot").json()
    assert default["details"]["generated_tokens"] == 16  # (the server's default_max_tokens)
    assert choice.text.startswith(default["generated_text"])
    root = httpx.post(
        served[0].base_url.removesuffix("/v1") + "/",
        json={"inputs": "Hi", "parameters": {"adapter_id": "robot", "max_new_tokens": 40}},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ).json()
    assert root == [{"generated_text": choice.text, "details": None}]  # (TGI's: a list)

    short = _lorax_post(served, "/generate", "Hi", adapter_id="pirate", max_new_tokens=3).json()
    assert short["details"]["finish_reason"] == "length"
    assert short["details"]["generated_tokens"] == 3
    stopped = _lorax_post(
        served, "/generate", "Hi", adapter_id="pirate", max_new_tokens=40, stop=["!"]
    ).json()
    assert stopped["generated_text"] == " Arr, matey!"  # (TGI's: the stop sequence kept)
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert "".join(t["text"] for t in stopped["details"]["tokens"]) == " Arr, matey!"
    streamed = _lorax_events(
        _lorax_post(
            served, "/generate_stream", "Hi", adapter_id="pirate", max_new_tokens=40, stop=["!"]
        )
    )
    assert "".join(e["token"]["text"] for e in streamed) == " Arr, matey!"
    assert streamed[-1]["generated_text"] == " Arr, matey!"
    full = _lorax_post(
        served, "/generate", "Hi", adapter_id="pirate", max_new_tokens=40, return_full_text=True
    ).json()
    assert (
        full["generated_text"]
        == "Hi"
        + _lorax_post(served, "/generate", "Hi", adapter_id="pirate", max_new_tokens=40).json()[
            "generated_text"
        ]
    )
    base = _lorax_post(served, "/generate", "Hi", max_new_tokens=40).json()
    assert base["generated_text"] == " " + demo.BASE_SIGNATURE
    assert base["details"]["seed"] is None  # (greedy)
    sampled = [
        _lorax_post(
            served, "/generate", "Hi", max_new_tokens=40, do_sample=True, temperature=0.7, seed=3
        ).json()
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and sampled[0]["details"]["seed"] == 3
    # (temperature 1 alone changes no distribution: greedy, as TGI's; 0.7 samples)
    neutral = _lorax_post(served, "/generate", "Hi", max_new_tokens=40, temperature=1.0).json()
    assert neutral == base
    warm = _lorax_post(served, "/generate", "Hi", max_new_tokens=40, temperature=0.7, seed=3).json()
    assert warm == sampled[0]  # (do_sample implied by the temperature)

    rich = _lorax_post(
        served,
        "/generate",
        "Hi",
        adapter_id="robot",
        max_new_tokens=40,
        decoder_input_details=True,
        return_k_alternatives=2,
    ).json()["details"]
    prefill = rich["prefill"]
    assert [t["id"] for t in prefill] == tokenizer.encode("Hi")
    assert prefill[0]["logprob"] is None and all(t["logprob"] <= 0 for t in prefill[1:])
    for token, top in zip(rich["tokens"], choice.logprobs.top_logprobs, strict=True):
        alternatives = token["alternative_tokens"]
        assert len(alternatives) == 2 and alternatives[0]["logprob"] >= alternatives[1]["logprob"]
        np.testing.assert_allclose(
            sorted(a["logprob"] for a in alternatives), sorted(top.values()), atol=1e-5
        )
    # TGI's spelling of the same: top_tokens beside the tokens, entries with a special flag.
    tgi = _lorax_post(
        served, "/generate", "Hi", adapter_id="robot", max_new_tokens=40, top_n_tokens=2
    ).json()["details"]
    assert "alternative_tokens" not in tgi["tokens"][0]
    assert [[a["id"] for a in step] for step in tgi["top_tokens"]] == [
        [a["id"] for a in t["alternative_tokens"]] for t in rich["tokens"]
    ]
    assert all(set(a) == {"id", "text", "logprob", "special"} for a in tgi["top_tokens"][0])
    # TGI's grammar and LoRAX's response_format constrain the output as response_format does.
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},  # (the demo model pads with blanks)
    }
    for constraint in (
        {"grammar": {"type": "json", "value": schema}},
        {"response_format": {"type": "json_object", "schema": schema}},
    ):
        text = _lorax_post(
            served, "/generate", "Hi", adapter_id="robot", max_new_tokens=60, **constraint
        ).json()["generated_text"]
        assert set(json.loads(text)) == {"a"} and 0 <= json.loads(text)["a"] <= 9, text
    digits = _lorax_post(
        served,
        "/generate",
        "Hi",
        max_new_tokens=8,
        grammar={"type": "regex", "value": "[0-9]{3}"},
    ).json()["generated_text"]
    assert re.fullmatch("[0-9]{3}", digits), digits


def test_lorax_info_tells_the_model_and_its_limits(served):
    """GET /info (TGI's and LoRAX's; no key, as /health): the served name, dtype, context and
    batch bounds of this server, and no adapter name."""
    info = httpx.get(served[0].base_url.removesuffix("/v1") + "/info", timeout=10).json()
    state = served[1]
    assert info["model_id"] == BASE and info["router"] == "jaxlora"
    assert info["model_dtype"] == "float32" and info["max_best_of"] == 1
    assert info["max_total_tokens"] == state.max_model_len == info["max_input_length"] + 1
    assert info["max_batch_size"] == state.engine.engine_config.runner.max_batch == 4
    assert info["max_concurrent_requests"] == 32
    assert info["max_stop_sequences"] == state.config.max_stop_strings
    assert not any(name in json.dumps(info) for name in demo.DEMO_SIGNATURES)


def test_lorax_generate_stream_sends_one_event_a_token(served, client):
    """POST /generate_stream (and POST / with stream true): one event a generated token with
    its id, text, logprob and special flag; the last carries the whole text and the details; the
    texts of the tokens not flagged special add up to it; no [DONE] event."""
    whole = _lorax_post(served, "/generate", "Hi", adapter_id="robot", max_new_tokens=40).json()
    for route, stream in (("/generate_stream", False), ("/", True)):
        response = _lorax_post(
            served, route, "Hi", stream=stream, adapter_id="robot", max_new_tokens=40
        )
        events = _lorax_events(response)
        assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        last = events[-1]
        assert last["generated_text"] == whole["generated_text"]
        assert last["details"]["finish_reason"] == "eos_token"
        assert last["details"]["generated_tokens"] == len(events)
        assert last["details"]["prompt_tokens"] == whole["details"]["prompt_tokens"]
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        assert text == whole["generated_text"]
        np.testing.assert_allclose(
            [e["token"]["logprob"] for e in events],
            [t["logprob"] for t in whole["details"]["tokens"]],
            atol=1e-5,
        )


def test_lorax_stream_sends_a_token_s_event_before_the_next_token(served, monkeypatch):
    """A token's event does not wait for the engine's next one: with the engine held right after
    it reports the first of 8 tokens, the first event still reaches the client (only the last
    token's event waits, for the finish reported with it). Then the rest of the stream as
    before."""
    from jaxlora.engine.request import Request

    held, release = threading.Event(), threading.Event()
    push = Request.push

    def push_then_hold(self, delta):
        push(self, delta)
        mine = self.sampling.max_tokens == 8
        if mine and delta.token_ids and not held.is_set() and len(self.output_ids) == 1:
            held.set()
            release.wait(30)  # the engine thread waits here: no second token meanwhile

    monkeypatch.setattr(Request, "push", push_then_hold)
    body = {
        "inputs": "Hi",
        "parameters": {
            **LORAX_CLIENT_PARAMETERS,
            "max_new_tokens": 8,
            "decoder_input_details": False,
        },
    }
    url = served[0].base_url.removesuffix("/v1") + "/generate_stream"
    events = []
    try:
        with httpx.stream(
            "POST", url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=20
        ) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
                    break
            assert held.is_set() and len(events) == 1 and events[0]["details"] is None
            release.set()
            events += [json.loads(x[len("data: ") :]) for x in lines if x.startswith("data: ")]
    finally:
        release.set()
    assert len(events) == 8 and events[-1]["details"]["generated_tokens"] == 8
    assert all(e["details"] is None for e in events[:-1])


def test_tgi_error_shapes_an_openai_error_as_lorax_answers_it():
    """TGI's (and LoRAX's) error answers: refusals 422 "validation", an overloaded server 429
    "overloaded", a failed generation 424 "generation", the rest their own status, untyped."""
    from jaxlora.server.errors import error_payload, tgi_error

    for status, expected in (
        (400, (422, "validation")),
        (413, (422, "validation")),
        (422, (422, "validation")),
        (429, (429, "overloaded")),
        (503, (429, "overloaded")),
        (500, (424, "generation")),
        (504, (424, "generation")),
        (404, (404, None)),
        (401, (401, None)),
    ):
        payload = error_payload(status, "parameters.x: why", type_="t", param="parameters.x")
        got_status, body = tgi_error(status, payload)
        assert got_status == expected[0] and body["error"] == "parameters.x: why", status
        assert body.get("error_type") == expected[1], status
    # A message that does not open with its field gets it in front (TGI has no field for it).
    payload = error_payload(404, "The model `x` does not exist", type_="t", param="parameters.a")
    assert tgi_error(404, payload) == (404, {"error": "parameters.a: The model `x` does not exist"})


def test_lorax_requests_it_cannot_honour_get_a_422_naming_the_parameter(served):
    """Hub / S3 / Predibase adapter sources, malformed per-request merges (and one beside
    adapter_id, or naming the base model), typical_p, watermark, best_of,
    a zero temperature (LoRAX's greedy is do_sample false), and errors of the completion a
    request becomes (too many stop strings) name the LoRAX field; in TGI's shape and status, as
    LoRAX answers (422, {"error", "error_type": "validation"}); an unknown adapter is a 404, an
    unknown or mistyped parameter a 422 too; the OpenAI routes keep OpenAI's shape."""
    for parameters, field in (
        ({"adapter_id": "robot", "adapter_source": "hub"}, "parameters.adapter_source"),
        ({"adapter_source": "ftp"}, "parameters.adapter_source"),
        (
            {"merged_adapters": {"ids": ["robot"], "weights": [1.0]}, "adapter_id": "robot"},
            "parameters.adapter_id",
        ),
        ({"merged_adapters": {"ids": []}}, "parameters.merged_adapters.ids"),
        ({"merged_adapters": {"ids": ["robot", ""]}}, "parameters.merged_adapters.ids[1]"),
        (
            {"merged_adapters": {"ids": ["robot", "pirate"], "weights": [1.0]}},
            "parameters.merged_adapters.weights",
        ),
        (
            {"merged_adapters": {"ids": ["robot"], "merge_strategy": "svd"}},
            "parameters.merged_adapters.merge_strategy",
        ),
        (
            {"merged_adapters": {"ids": ["robot"], "merge_strategy": "ties", "density": 1.5}},
            "parameters.merged_adapters.density",
        ),
        (
            {"merged_adapters": {"ids": ["robot"], "majority_sign_method": "median"}},
            "parameters.merged_adapters.majority_sign_method",
        ),
        (
            {"merged_adapters": {"ids": [demo.DEMO_MODEL_NAME]}},
            "parameters.merged_adapters.ids[0]",
        ),
        (  # (a weight past float32's range, whose merge would be inf)
            {"merged_adapters": {"ids": ["robot"], "weights": [1e300]}},
            "parameters.merged_adapters: merge 'merged-",
        ),
        ({"typical_p": 0.5}, "parameters.typical_p"),
        ({"watermark": True}, "parameters.watermark"),
        ({"best_of": 2}, "parameters.best_of"),
        ({"temperature": 0.0}, "parameters.temperature"),
        ({"top_p": 1.0}, "parameters.top_p"),
        ({"stop": ["x"] * 65}, "parameters.stop"),
        ({"decoder_input_details": True, "details": False}, "parameters.decoder_input_details"),
        ({"return_k_alternatives": 2, "top_n_tokens": 2}, "parameters.top_n_tokens"),
        ({"top_n_tokens": 21}, "parameters.top_n_tokens"),
        ({"grammar": {"type": "regex", "value": {"a": 1}}}, "parameters.grammar.value"),
        (
            {
                "grammar": {"type": "regex", "value": "x"},
                "response_format": {"type": "json_object"},
            },
            "parameters.grammar",
        ),
        ({"grammar": {"type": "regex", "value": "("}}, "parameters.grammar"),
        ({"response_format": {"type": "json_object", "schema": []}}, "parameters.response_format"),
    ):
        answer = _lorax_post(served, "/generate", "Hi", **parameters)
        assert answer.status_code == 422, (parameters, answer.text)
        error = answer.json()
        assert set(error) == {"error", "error_type"} and error["error_type"] == "validation"
        assert error["error"].startswith(field), error  # (a nested field: its path)
    missing = _lorax_post(served, "/generate", "Hi", adapter_id="no-such-adapter")
    assert missing.status_code == 404 and "no-such-adapter" in missing.json()["error"]
    assert missing.json()["error"].startswith("parameters.adapter_id: ")
    for route in ("/generate_stream", "/"):
        unknown = _lorax_post(served, route, "Hi", no_such_parameter=1)
        assert unknown.status_code == 422, unknown.text
        assert unknown.json()["error"].startswith("parameters.no_such_parameter")
    streamed = _lorax_post(served, "/generate", "Hi", stream=True)
    assert streamed.status_code == 422 and streamed.json()["error"].startswith("stream")
    loose = _lorax_post(served, "/generate", "Hi", max_new_tokens="5")  # (types are strict)
    assert loose.status_code == 422 and "max_new_tokens" in loose.json()["error"]
    empty = _lorax_post(served, "/generate", "")
    assert empty.status_code == 422 and empty.json()["error"].startswith("inputs")
    unauthorized = httpx.post(
        served[0].base_url.removesuffix("/v1") + "/generate", json={"inputs": "Hi"}, timeout=60
    )
    assert unauthorized.status_code == 401 and set(unauthorized.json()) == {"error"}
    # The OpenAI routes are not touched.
    openai_error = httpx.post(
        served[0].base_url + "/completions",
        json={"model": "robot", "prompt": "Hi", "typical_p": 0.5},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert openai_error.status_code == 400 and "message" in openai_error.json()["error"]


def test_error_answers_have_the_right_status_and_say_why(served, client):
    expect_error(404, lambda: chat(client, "no-such-adapter"), "no-such-adapter")
    too_long = "hello " * 200
    body = expect_error(
        400, lambda: client.completions.create(model="pirate", prompt=too_long), "context length"
    )
    assert body.get("param") == "prompt"
    body = expect_error(
        400,
        lambda: client.completions.create(model="pirate", prompt="Hi", max_tokens=500),
        "max_tokens",
    )
    assert body.get("param") == "max_tokens"
    expect_error(400, lambda: chat(client, "pirate", max_tokens=0), "max_tokens")
    body = expect_error(400, lambda: chat(client, "pirate", temperature=-1), "temperature")
    assert body.get("param") == "temperature"
    expect_error(400, lambda: chat(client, "pirate", top_p=2), "top_p")
    expect_error(400, lambda: chat(client, "pirate", n=100), "n:")
    expect_error(400, lambda: chat(client, "pirate", presence_penalty=2.5), "presence_penalty")
    expect_error(400, lambda: chat(client, "pirate", top_logprobs=2), "top_logprobs")
    expect_error(400, lambda: chat(client, "pirate", extra_body={"frobnicate": 1}), "frobnicate")
    expect_error(
        400,
        lambda: chat(client, "pirate", extra_body={"stop_token_ids": [99999]}),
        "stop_token_ids",
    )
    expect_error(400, lambda: client.completions.create(model="pirate", prompt=[[]]), "prompt")
    expect_error(
        400, lambda: client.completions.create(model="pirate", prompt=[70000]), "vocabulary"
    )
    expect_error(
        400,
        lambda: client.chat.completions.create(
            model="pirate", messages=[{"role": "wizard", "content": "hi"}]
        ),
        "role",
    )
    expect_error(
        401,
        lambda: openai.OpenAI(
            base_url=served[0].base_url, api_key="wrong", max_retries=0
        ).models.list(),
        "API key",
    )
    url = served[0].url
    raw = httpx.post(
        f"{url}/v1/completions",
        content=b"{oops",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and "error" in raw.json()
    assert (
        httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == 401
    )
    missing = httpx.get(f"{url}/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    # The server is unharmed.
    assert chat(client, "pirate").choices[0].message.content == demo.DEMO_SIGNATURES["pirate"]
    assert wait_until(lambda: engine_idle(served[1]))


def test_full_queue_answers_503_and_every_admitted_request_completes(served, aclient_factory):
    """More concurrent requests than the queue holds (32 + the running 4): some are refused with
    503 and Retry-After, every other one completes, nothing leaks."""
    state = served[1]
    free_before = state.engine.kv.free_pages

    async def one(aclient, i):
        try:
            out = await aclient.completions.create(
                model=list(VOICES)[i % 4],
                prompt=f"Request {i}",
                temperature=0,
                max_tokens=48,
                extra_body={"ignore_eos": True},
            )
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("retry-after")
        return 200, out.usage.completion_tokens

    async def run_all():
        aclient = aclient_factory()
        async with aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(80)))

    results = asyncio.run(run_all())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) >= 32
    assert all(extra == 48 for s, extra in results if s == 200)
    assert all(extra == "1" for s, extra in results if s == 503)
    assert wait_until(lambda: engine_idle(state))
    assert state.engine.kv.free_pages == free_before


def test_disconnect_mid_stream_or_while_queued_cancels_and_frees_pages(served):
    state = served[1]
    engine = state.engine
    url = served[0].url
    free_before = engine.kv.free_pages
    before = parse_metrics(httpx.get(f"{url}/metrics").text)
    body = {
        "model": "robot",
        "prompt": "Go on and on",
        "max_tokens": 100,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                # The line iterator is kept: a discarded one is closed at once, and closing it
                # closes the connection (httpcore), a disconnect before engine.stop() that the
                # engine could act on first (about one run in six on a loaded machine).
                lines = response.iter_lines()
                assert next(lines).startswith("data: {")
                # Held still, the engine cannot end the request by itself meanwhile.
                engine.stop()
            # Leaving the block closed the connection mid-stream. Next, a non-streaming client
            # that gives up while its request waits in the queue.
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/completions", timeout=0.3, json={**body, "stream": False})
        assert wait_until(lambda: state.pump.cancelling == 2, timeout=10), (
            f"cancelling {state.pump.cancelling}, open {state.pump.open_requests}, running "
            f"{engine.num_running}, waiting {engine.num_waiting}"
        )
    finally:
        engine.start()
    assert wait_until(lambda: engine_idle(state), timeout=20)
    assert engine.kv.free_pages == free_before
    assert state.adapters.stats().referenced == 0
    after = parse_metrics(httpx.get(f"{url}/metrics").text)
    finished = {
        dict(k[1])["finish_reason"]: v - before.get(k, 0)
        for k, v in after.items()
        if k[0] == "jaxlora_requests_finished_total"
        and dict(k[1])["model"] == "robot"
        and v != before.get(k, 0)
    }
    assert finished == {"abort": 2}


# ---------------------------------------------------------------------------- runtime adapters


def load(url, name, path, **extra):
    return httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": path, **extra},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


def unload(url, name):
    return httpx.post(
        f"{url}/v1/unload_lora_adapter",
        json={"lora_name": name},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


def test_an_unload_waiting_for_a_merge_leaves_the_event_loop_free(served, adapter_root):
    """An unload waits for the merge lock, which a per-request merge holds while it is
    computed (seconds for a large model): meanwhile the server answers everyone else."""
    state, url = served[1], served[0].url
    assert load(url, "unload_me", "pirate_copy").status_code == 200
    held, release = threading.Event(), threading.Event()

    def merging():  # (what request_merge does while it computes)
        with state._merge_lock:
            held.set()
            release.wait(10)

    merge = threading.Thread(target=merging)
    merge.start()
    unloading = None
    try:
        assert held.wait(5)
        unloading = threading.Thread(target=lambda: unload(url, "unload_me"))
        unloading.start()
        time.sleep(0.2)  # (the unload is waiting for the lock)
        began = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.monotonic() - began < 1.0
        assert unloading.is_alive()  # (its answer still waits for the merge)
    finally:
        release.set()
        merge.join()
        if unloading is not None:
            unloading.join(10)
    assert "unload_me" not in state.adapters.store


def test_runtime_load_failures_are_400_with_the_reason(served, adapter_root):
    root, outside = adapter_root
    url = served[0].url
    cases = {
        "../outside": "not inside an allowed adapter root",
        outside: "not inside an allowed adapter root",
        "link_out": "not inside an allowed adapter root",
        "pirate_copy/../../outside": "not inside an allowed adapter root",
        "pickled": "pickle",
        "broken_config": "adapter_config.json",
        "does_not_exist": "no such adapter directory",
    }
    for path, reason in cases.items():
        response = load(url, "new_one", path)
        assert response.status_code == 400, (path, response.text)
        assert reason in response.json()["error"]["message"], (path, response.text)
    taken = load(url, "pirate", "pirate_copy")
    assert taken.status_code == 400 and "already been loaded" in taken.text
    assert load(url, BASE, "pirate_copy").status_code == 400
    assert unload(url, "never_loaded").status_code == 404
    assert "new_one" not in {
        m["id"]
        for m in httpx.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
        ).json()["data"]
    }


def test_lorax_merged_adapters_run_lorax_s_merge(served):
    """LoRAX's per-request merged_adapters: the pirate alone at weight 1 answers as the pirate
    does; the robot and the pirate half each (linear), or by TIES, answer otherwise; a merge
    is computed once and kept as one adapter (``merged-<digest>``), at most
    max_request_merges of them (the least recently requested unloaded first); an unknown
    part is a 404 naming its place; off (0), the request is refused by name."""
    state = served[1]
    before = set(state.adapters.store.names())

    def generate(**parameters):
        answer = _lorax_post(served, "/generate", "Hi", max_new_tokens=8, **parameters)
        assert answer.status_code == 200, (parameters, answer.text)
        return answer.json()["generated_text"]

    def merged_names():
        return sorted(set(state.adapters.store.names()) - before)

    pirate, robot = generate(adapter_id="pirate"), generate(adapter_id="robot")
    assert pirate != robot
    config = state.config
    try:
        assert generate(merged_adapters={"ids": ["pirate"], "weights": [1.0]}) == pirate
        assert len(merged_names()) == 1 and merged_names()[0].startswith("merged-")
        half = {"ids": ["robot", "pirate"], "weights": [0.5, 0.5]}
        mixed = generate(merged_adapters=half)
        assert mixed not in (pirate, robot)
        assert generate(merged_adapters=half) == mixed  # (the same adapter again)
        assert len(merged_names()) == 2
        ties = {**half, "merge_strategy": "ties", "density": 0.5}
        assert generate(merged_adapters=ties) != mixed
        assert len(merged_names()) == 3
        # weights [] are 1 each; streamed too
        stream = _lorax_post(
            served, "/generate_stream", "Hi", max_new_tokens=8, merged_adapters={"ids": ["pirate"]}
        )
        assert stream.status_code == 200
        assert _lorax_events(stream)[-1]["generated_text"] == pirate
        assert len(merged_names()) == 3  # (weights [] are [1.0]: the same merge)
        # At most two kept: the least recently requested go.
        state.config = dataclasses.replace(config, max_request_merges=2)
        generate(merged_adapters=half)  # (now the most recent)
        generate(merged_adapters={"ids": ["poet"]})
        kept = merged_names()
        assert len(kept) == 2
        assert generate(merged_adapters=half) == mixed and merged_names() == kept
        missing = _lorax_post(
            served, "/generate", "Hi", merged_adapters={"ids": ["pirate", "nobody"]}
        )
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"].startswith("parameters.merged_adapters.ids[1]: ")
        # Weights that overflow the activations: TGI's generation error, and the NaN its
        # pages held reaches nobody after it.
        overflow = _lorax_post(
            served, "/generate", "Hi", merged_adapters={"ids": ["pirate"], "weights": [1e30]}
        )
        assert overflow.status_code == 424, overflow.text
        assert "logits at output token 0 are not finite" in overflow.json()["error"]
        assert generate(adapter_id="pirate") == pirate
        state.config = dataclasses.replace(config, max_request_merges=0)
        off = _lorax_post(served, "/generate", "Hi", merged_adapters={"ids": ["pirate"]})
        assert off.status_code == 422 and "--max_request_merges=0" in off.json()["error"]
        assert off.json()["error"].startswith("parameters.merged_adapters: ")
        assert not state._merge_holds  # (each handler let its merge go)
        # /metrics names every per-request merge "merged-*" (a client makes new digests
        # without bound: a weight of 1.001 is another merge), and forgets unloaded ones.
        text = httpx.get(f"{served[0].url}/metrics").text
        assert 'jaxlora_requests_total{model="merged-*"}' in text
        assert set(re.findall(r"merged-[0-9a-f]{16}", text)) <= set(merged_names())
        assert 'model="merged-' not in text.replace('model="merged-*"', "")
        registered = set(state.adapters.store.names())
        assert set(state.adapters.stats().load_seconds) <= registered
        counted = state.engine.stats.requests_per_adapter
        assert {n for n in counted if re.fullmatch(r"merged-[0-9a-f]{16}", n)} <= registered
    finally:
        state.config = config
        for name in merged_names():
            state.unload_adapter(name)


def test_usage_counts_the_prompt_tokens_found_computed():
    """--enable_prompt_tokens_details (vLLM's): usage.prompt_tokens_details.cached_tokens, the
    prompt tokens whose K/V the prefix cache held (full pages of the same adapter), in whole
    answers and a stream's last usage chunk, each prompt counted once with n choices; off,
    null as before; the Responses API's input_tokens_details.cached_tokens counts them either
    way (it said 0 whatever the cache held)."""
    server, state = start_demo_server(prefix_caching=True)
    url, config = server.url, state.config
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    page = state.llm.engine.kv.config.page_size
    content = " ".join(demo.DEMO_PROMPTS)
    messages = [{"role": "user", "content": content}]
    try:
        first = chat(client, "pirate", content)
        assert first.usage.prompt_tokens_details is None  # (off: vLLM's default)
        state.config = dataclasses.replace(config, enable_prompt_tokens_details=True)
        again = chat(client, "pirate", content)
        cached = again.usage.prompt_tokens_details.cached_tokens
        prompt = again.usage.prompt_tokens
        assert cached == (prompt - 1) // page * page and cached > 0, (cached, prompt)
        assert chat(client, "robot", content).usage.prompt_tokens_details.cached_tokens == 0
        streamed = list(
            client.chat.completions.create(
                model="pirate",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached
        two = client.chat.completions.create(model="pirate", messages=messages, n=2, **GREEDY)
        assert two.usage.prompt_tokens == prompt
        assert two.usage.prompt_tokens_details.cached_tokens == cached
        completion = client.completions.create(model="robot", prompt=content, **GREEDY)
        assert completion.usage.prompt_tokens_details.cached_tokens == 0
        completion = client.completions.create(model="robot", prompt=content, **GREEDY)
        tokens = completion.usage.prompt_tokens
        assert completion.usage.prompt_tokens_details.cached_tokens == (tokens - 1) // page * page
        state.config = config
        response = httpx.post(
            f"{url}/v1/responses",
            json={"model": "pirate", "input": content, "temperature": 0, "max_output_tokens": 8},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ).json()
        assert response["usage"]["input_tokens"] == prompt
        assert response["usage"]["input_tokens_details"]["cached_tokens"] == cached
    finally:
        server.stop()


def test_per_request_merge_names_cannot_be_taken_by_a_loaded_adapter(served, adapter_root):
    """A per-request merge's name is the digest of its parts: an adapter loaded or merged under
    a name of that form (merged-<16 hex digits>) was served as that merge to whoever asked for
    it next (the merge found the name taken and used it), and counted as a merge on /metrics.
    Such names are refused, naming lora_name; the merge computes its own adapter."""
    state, url = served[1], served[0].url
    name = state.request_merge(
        [("pirate", 1.0)], strategy="linear", density=1.0, majority_sign_method="total"
    )
    state.release_merge(name)
    state.unload_adapter(name)
    taken = load(url, name, "robot_copy")
    assert taken.status_code == 400, taken.text
    assert taken.json()["error"]["param"] == "lora_name"
    assert "reserved" in taken.json()["error"]["message"]
    merged = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={
            "lora_name": "merged-0123456789abcdef",
            "merge": [{"lora_name": "robot", "weight": 1}],
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert merged.status_code == 400 and "reserved" in merged.text, merged.text
    assert name not in state.adapters.store.names()
    # Names that only look alike stay free.
    assert load(url, "merged-robot", "robot_copy").status_code == 200
    assert unload(url, "merged-robot").status_code == 200


def test_launch_refuses_a_startup_adapter_under_a_merge_s_name(tmp_path):
    from jaxlora.server.launch import LaunchConfig, build_state

    pirate = demo.adapter_dirs()["pirate"]
    with pytest.raises(ConfigError, match=r"^--lora_modules: adapter name 'merged-0{16}' is "):
        build_state(LaunchConfig(lora_modules=(f"{'merged-' + '0' * 16}={pirate}",)))
    root = tmp_path / "root"
    shutil.copytree(pirate, root / ("merged-" + "a" * 16))
    with pytest.raises(ConfigError, match=r"^--lora_dirs: adapter name 'merged-a{16}' is "):
        build_state(LaunchConfig(lora_dirs=(str(root),), kv_pages=16))


def test_a_keys_limits_refuse_a_merge_before_it_is_computed(served, monkeypatch):
    """A per-request merge is work and a place among max_request_merges: a request its key's
    tokens a minute or in-flight bound refuse is refused before the merge (it was computed and
    registered first, pushing other keys' merges out)."""
    from jaxlora.server.keys import ApiKey

    state = served[1]
    before = set(state.adapters.store.names())
    monkeypatch.setattr(state, "_buckets", {})
    poor = ApiKey("poor", "sk-poor-0123456789abcdef", ("*",), max_tokens_per_minute=20)
    busy = ApiKey("busy", "sk-busy-0123456789abcdef", ("*",), max_in_flight=1)
    monkeypatch.setattr(state, "config", dataclasses.replace(state.config, api_keys=(poor, busy)))
    url = served[0].base_url.removesuffix("/v1") + "/generate"

    def post(key, **parameters):
        body = {
            "inputs": "Hi",
            "parameters": {"merged_adapters": {"ids": ["pirate"]}, **parameters},
        }
        return httpx.post(
            url, json=body, headers={"Authorization": f"Bearer {key.key}"}, timeout=60
        )

    merges = []
    monkeypatch.setattr(
        state, "request_merge", lambda *a, **k: merges.append(a) or pytest.fail("merged")
    )
    over = post(poor, max_new_tokens=1000)
    assert over.status_code == 422 and "more than API key 'poor'" in over.json()["error"]
    monkeypatch.setitem(state._in_flight, "busy", 1)
    full = post(busy, max_new_tokens=4)
    assert full.status_code == 429 and "max_in_flight" in full.json()["error"]
    assert merges == [] and set(state.adapters.store.names()) == before


def test_a_request_merge_in_use_is_not_unloaded(served, monkeypatch):
    """Past max_request_merges the least recently requested merge that nothing uses goes: one
    held by its handler (merged, its request not yet submitted) or waited for / run on by a
    request of the engine stays, over the limit, until a later merge finds it unused."""
    state = served[1]
    store = state.adapters.store
    before = set(store.names())
    config = state.config
    merge = functools.partial(
        state.request_merge, strategy="linear", density=1.0, majority_sign_method="total"
    )
    in_queue: dict[str, int] = {}
    real_snapshot = state.engine.queue_snapshot

    def snapshot():
        return dataclasses.replace(real_snapshot(), waiting=dict(in_queue))

    monkeypatch.setattr(state.engine, "queue_snapshot", snapshot)
    try:
        state.config = dataclasses.replace(config, max_request_merges=1)
        first = merge([("pirate", 1.0)])  # held by its (pretended) handler
        second = merge([("robot", 1.0)])
        assert first in store and second in store  # (the first still held: over the limit)
        state.release_merge(first)
        in_queue[second] = 1  # (its request waits in the engine's queue)
        state.release_merge(second)
        third = merge([("poet", 1.0)])
        assert first not in store and second in store and third in store
        state.release_merge(third)
        in_queue.clear()  # (the request ended)
        fourth = merge([("pirate", 0.5)])
        assert {second, third} & set(store.names()) == set() and fourth in store
        assert merge([("pirate", 0.5)]) == fourth  # (the same merge: held twice, kept)
        state.release_merge(fourth)
        state.release_merge(fourth)
        assert not state._merge_holds
    finally:
        state.config = config
        for name in set(store.names()) - before:
            state.unload_adapter(name)
        assert not state._request_merges


def test_merged_adapters_load_at_runtime(served, client):
    """load_lora_adapter with ``merge`` (jaxlora's): the weighted sum of loaded adapters'
    updates. The pirate at weight 1 (the same rows) and beside the robot at weight 0 (rows that
    add zero) answers as the pirate does; load_inplace replaces a merge; bad merges are 400 or
    404 naming the field."""
    url = served[0].url
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def merge(name, parts, **extra):
        body = {"lora_name": name, "merge": [{"lora_name": n, "weight": w} for n, w in parts]}
        return httpx.post(f"{url}/v1/load_lora_adapter", json={**body, **extra}, headers=headers)

    def text(model):
        return client.completions.create(model=model, prompt="Hi", **GREEDY).choices[0].text

    pirate = text("pirate")
    try:
        assert merge("pirate_again", [("pirate", 1.0)]).status_code == 200
        assert text("pirate_again") == pirate
        replaced = merge("pirate_again", [("pirate", 1.0), ("robot", 0.0)], load_inplace=True)
        assert replaced.status_code == 200, replaced.text
        assert text("pirate_again") == pirate
        assert merge("half_robot", [("robot", 0.5), ("pirate", 0.5)]).status_code == 200
        assert text("half_robot") not in (pirate, text("robot"))
        ids = {m.id for m in client.models.list().data}
        assert {"pirate_again", "half_robot"} <= ids
        for body, status, param in (
            ({"lora_name": "x"}, 400, "lora_path"),
            ({"lora_name": "x", "lora_path": "pirate_copy", "merge": []}, 400, "lora_path"),
            ({"lora_name": "x", "merge": []}, 400, "merge"),
            (
                {"lora_name": "x", "merge": [{"lora_name": "pirate", "weight": "a"}]},
                400,
                "merge[0].weight",
            ),
            (
                {
                    "lora_name": "x",
                    "merge": [
                        {"lora_name": "pirate", "weight": 1},
                        {"lora_name": "nobody", "weight": 1},
                    ],
                },
                404,
                "merge[1].lora_name",
            ),
            (
                {"lora_name": "pirate", "merge": [{"lora_name": "robot", "weight": 1}]},
                400,
                "lora_name",
            ),
            (
                {"lora_name": "x", "merge": [{"lora_name": "pirate", "weight": 1}] * 64},
                400,
                "merge",
            ),
        ):
            response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["param"] == param, (body, response.text)
    finally:
        for name in ("pirate_again", "half_robot"):
            unload(url, name)
    assert "x" not in {m.id for m in client.models.list().data}


def test_tenant_keys_reach_their_own_models_only(tmp_path):
    """--api_keys_file: a tenant's key uses the models its patterns name, and to it the others
    do not exist (the unknown model's 404, not listed); admin routes take an admin key (403
    otherwise); a stored response is its creator's key's only; --api_key stays an admin of
    everything. A bad file is refused naming the entry and field."""
    from jaxlora.server.keys import ApiKey, KeysFile, load_api_keys

    acme_secret, ops_secret = "sk-acme-0123456789abcdef", "sk-ops-0123456789abcdef"
    capped_secret = "sk-capped-0123456789abcdef"
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "acme", "key": acme_secret, "models": ["pirate", "rob*"]},
                    {"name": "ops", "key": ops_secret, "models": ["*"], "admin": True},
                    {"name": "capped", "key": capped_secret, "models": ["*"], "max_in_flight": 1},
                ]
            }
        )
    )
    keys = load_api_keys(str(keys_file))
    assert [(k.name, k.models, k.admin, k.max_in_flight) for k in keys] == [
        ("acme", ("pirate", "rob*"), False, None),
        ("ops", ("*",), True, None),
        ("capped", ("*",), False, 1),
    ]
    assert acme_secret not in repr(keys)
    server, state = start_demo_server(api_key=None, api_keys=keys, fair_share_by="key")
    try:
        acme, ops, single = (
            openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0)
            for secret in (acme_secret, ops_secret, API_KEY)
        )
        assert {m.id for m in acme.models.list().data} == {"pirate", "robot"}
        # Where an adapter lies on the server's disk is shown to admins only.
        roots = {card["id"]: card["root"] for card in state.models()}
        assert all(m.root == m.id for m in acme.models.list().data)
        assert acme.models.retrieve("pirate").root == "pirate"
        assert {m.id: m.root for m in ops.models.list().data} == roots
        assert ops.models.retrieve("pirate").root == roots["pirate"] != "pirate"
        assert {m.id for m in ops.models.list().data} == {BASE, *demo.DEMO_SIGNATURES}
        assert chat(acme, "pirate").choices[0].message.content == demo.DEMO_SIGNATURES["pirate"]
        hidden = expect_error(404, lambda: chat(acme, "poet"), "The model `poet` does not exist")
        unknown = expect_error(404, lambda: chat(acme, "nobody"))
        assert hidden["message"].replace("poet", "nobody") == unknown["message"]
        expect_error(404, lambda: acme.completions.create(model=BASE, prompt="Hi", **GREEDY))
        expect_error(404, lambda: acme.models.retrieve("poet"))
        assert chat(ops, "poet").choices[0].message.content == demo.DEMO_SIGNATURES["poet"]
        # (the one --api_key is not taken beside a keys file unless given: here it is not)
        expect_error(401, lambda: single.models.list())
        url = server.url
        denied = httpx.post(
            f"{url}/reset_prefix_cache", headers={"Authorization": f"Bearer {acme_secret}"}
        )
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error"
        assert "'acme' may not reset the prefix cache" in denied.json()["error"]["message"]
        unload = {"lora_name": "pirate"}
        with pytest.raises(openai.PermissionDeniedError):
            acme.post("/unload_lora_adapter", body=unload, cast_to=httpx.Response)
        allowed = httpx.post(
            f"{url}/reset_prefix_cache", headers={"Authorization": f"Bearer {ops_secret}"}
        )
        assert allowed.status_code == 200
        # A stored response is acme's only: ops cannot read, continue or delete it.
        stored = acme.responses.create(model="pirate", input="Hi", temperature=0)
        assert acme.responses.retrieve(stored.id).id == stored.id
        for call in (
            lambda: ops.responses.retrieve(stored.id),
            lambda: ops.responses.input_items.list(stored.id),
            lambda: ops.responses.delete(stored.id),
            lambda: ops.responses.create(
                model="pirate", input="More", previous_response_id=stored.id
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        acme.responses.delete(stored.id)
        # /invocations and /tokenize answer by the same rule.
        invoked = httpx.post(
            f"{url}/invocations",
            json={"model": "poet", "prompt": "Hi"},
            headers={"Authorization": f"Bearer {acme_secret}"},
        )
        assert invoked.status_code == 404
        tokenized = httpx.post(
            f"{url}/tokenize",
            json={"model": "poet", "prompt": "Hi"},
            headers={"Authorization": f"Bearer {acme_secret}"},
        )
        assert tokenized.status_code == 404
        # max_in_flight 1: a second generation while one streams is a 429 (Retry-After); a
        # request of n=2 could never fit, a 400 naming n (a 429 would be retried for ever);
        # once the stream ends, the key may go on.
        capped = openai.OpenAI(base_url=server.base_url, api_key=capped_secret, max_retries=0)
        running = chat(capped, "robot", stream=True, max_tokens=40, extra_body={"ignore_eos": True})
        next(iter(running))
        with pytest.raises(openai.RateLimitError) as limited:
            chat(capped, "poet")
        assert limited.value.response.headers["retry-after"] == "1"
        assert "'capped' has 1 generations in flight" in limited.value.body["message"]
        assert len([c for c in running if c.choices and c.choices[0].delta.content]) > 0
        assert wait_until(lambda: engine_idle(state))
        with pytest.raises(openai.BadRequestError, match="max_in_flight"):
            chat(capped, "poet", n=2)
        assert wait_until(lambda: engine_idle(state)) and not state._in_flight
        assert chat(capped, "poet").choices[0].message.content == demo.DEMO_SIGNATURES["poet"]
        # --fair_share_by=key: the engine's tenants are the keys (its fair-share counters).
        assert {"acme", "ops", "capped"} <= set(state.engine.queue_snapshot().fair_service)
        # Usage by key (billing per customer): acme's two generations, ops' one.
        assert wait_until(lambda: engine_idle(state))
        usage = parse_metrics(httpx.get(f"{url}/metrics").text)
        assert metric(usage, "jaxlora_api_key_requests_total", key="acme") == 2
        assert metric(usage, "jaxlora_api_key_requests_total", key="ops") == 1
        generated = metric(usage, "jaxlora_api_key_tokens_total", key="acme", kind="generation")
        assert (
            generated
            == stored.usage.output_tokens
            + len(state.tokenizer.encode(demo.DEMO_SIGNATURES["pirate"], add_bos=False))
            + 1
        )
        # The keys file read again when it changes: a new customer's key works and a removed
        # one does not, without a restart; a file that breaks keeps the keys read before.
        state.keys_file = KeysFile(str(keys_file), check_every_s=0)
        newco_secret = "sk-newco-0123456789abcdef"
        document = json.loads(keys_file.read_text())
        document["keys"] = [k for k in document["keys"] if k["name"] != "acme"]
        document["keys"].append({"name": "newco", "key": newco_secret, "models": ["poet"]})
        keys_file.write_text(json.dumps(document))
        newco = openai.OpenAI(base_url=server.base_url, api_key=newco_secret, max_retries=0)
        assert {m.id for m in newco.models.list().data} == {"poet"}
        expect_error(401, lambda: acme.models.list())
        keys_file.write_text("{broken")
        assert {m.id for m in newco.models.list().data} == {"poet"}
        keys_file.unlink()
        assert {m.id for m in newco.models.list().data} == {"poet"}
    finally:
        server.stop()
    # --api_key beside the file: an admin of everything.
    with pytest.raises(ConfigError, match="'fair_share_by': 'key' needs API keys"):
        ServerConfig(model_name="m", fair_share_by="key")
    with pytest.raises(ConfigError, match="expected 'model' or 'key'"):
        ServerConfig(model_name="m", api_key=API_KEY, fair_share_by="adapter")
    both = ServerConfig(model_name="m", api_key=API_KEY, api_keys=keys)
    assert [k.name for k in both.keys] == ["acme", "ops", "capped", "api_key"]
    assert both.keys[-1].admin
    with pytest.raises(ConfigError, match="keys.1..key: .not shown. is used twice"):
        ServerConfig(model_name="m", api_key=acme_secret, api_keys=keys[:1])
    for document, needle in (
        ({"keys": []}, "expected"),
        ({"keys": [{"name": "a", "key": "short", "models": ["*"]}]}, r"keys\[0\]\.key: "),
        ({"keys": [{"name": "a", "key": acme_secret}]}, r"keys\[0\]\.models: missing"),
        ({"keys": [{"name": "a", "key": acme_secret, "models": "*"}]}, "non-empty list"),
        ({"keys": [{"name": "a b", "key": acme_secret, "models": ["*"]}]}, "letters, digits"),
        (
            {"keys": [{"name": "a", "key": acme_secret, "models": ["*"], "admin": "yes"}]},
            "admin: expected true or false",
        ),
        ({"keys": [{"name": "a", "key": acme_secret, "models": ["*"], "role": 1}]}, "role"),
        (
            {"keys": [{"name": "a", "key": acme_secret, "models": ["*"], "max_in_flight": 0}]},
            "max_in_flight: expected an int >= 1",
        ),
        (
            {
                "keys": [
                    {"name": "a", "key": acme_secret, "models": ["*"], "max_tokens_per_minute": 1.5}
                ]
            },
            "max_tokens_per_minute: expected an int >= 1",
        ),
        (
            {
                "keys": [
                    {"name": "a", "key": acme_secret, "models": ["*"]},
                    {"name": "a", "key": ops_secret, "models": ["*"]},
                ]
            },
            r"keys\[1\]\.name: 'a' is used twice",
        ),
    ):
        keys_file.write_text(json.dumps(document))
        with pytest.raises(ConfigError, match=needle):
            load_api_keys(str(keys_file))
    keys_file.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON file"):
        load_api_keys(str(keys_file))
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys(str(tmp_path / "none.json"))
    assert ApiKey("x", "k", ("a?c", "[bd]*")).allows("abc")
    assert not ApiKey("x", "k", ("a?c",)).allows("abbc")


def test_tenant_names_that_match_no_model_are_warned_about(served):
    """At start-up, a key's models pattern or a fair-share weight that names no model served
    (or no key, under --fair_share_by=key) is reported: most likely a typo."""
    from jaxlora.server.keys import ApiKey
    from jaxlora.server.launch import unmatched_names

    state = served[1]
    keys = (ApiKey("acme", "sk-acme-0123456789abcdef", ("pirate", "pirat*", "parrot*")),)
    config = dataclasses.replace(state.config, api_keys=keys)
    by_model = LaunchConfig(fair_share_weights=(("robot", 2.0), ("robut", 2.0)))
    by_key = LaunchConfig(fair_share_by="key", fair_share_weights=(("acme", 2.0), ("acne", 1.0)))
    try:
        original, state.config = state.config, config
        assert unmatched_names(state, by_model) == [
            "--api_keys_file: key 'acme': models pattern 'parrot*' matches no model served now",
            "--fair_share_weights: 'robut' names no model of this server",
        ]
        assert unmatched_names(state, by_key)[1:] == [
            "--fair_share_weights: 'acne' names no API key of this server"
        ]
    finally:
        state.config = original


def test_the_readmes_keys_file_loads(tmp_path):
    """The README's example keys file is one load_api_keys takes, as shown there."""
    from jaxlora.server.keys import load_api_keys

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    example = readme.split("cat > keys.json <<'JSON'\n", 1)[1].split("    JSON\n", 1)[0]
    path = tmp_path / "keys.json"
    path.write_text(example)
    keys = {k.name: k for k in load_api_keys(str(path))}
    assert keys["acme"].allows("acme-support") and not keys["acme"].allows("globex-sql")
    assert keys["acme"].max_in_flight == 16 and keys["ops"].admin and not keys["globex"].admin
    assert keys["acme"].max_tokens_per_minute == 200000
    assert keys["globex"].priority == 10 and keys["globex"].priority_of(None) == 10
    assert keys["globex"].priority_of(3) == 10 and keys["acme"].priority_of(3) == 3


def test_requests_load_adapters_on_demand_from_the_roots(adapter_root):
    """load_adapters_on_demand: a request naming an adapter directory under the roots loads it
    (once, for concurrent requests) and is served by it; what is outside the roots or no adapter
    directory stays 404, and so does any other spelling of a directory's path ("./a", "a/",
    "b/../a": each would register a's weights again, and "b/../a" would pass an API key's
    pattern for b); a directory that does not load is a 400 naming `model`."""
    root, outside = adapter_root
    server, state = start_demo_server(adapter_roots=(root,), load_adapters_on_demand=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    register = state.adapters.register

    def slow_register(*args, **kwargs):  # the four requests below all arrive while it loads
        time.sleep(0.3)
        return register(*args, **kwargs)

    state.adapters.register = slow_register
    try:
        aclient = openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60
        )

        async def ask_all():
            return await asyncio.gather(
                *[
                    aclient.chat.completions.create(
                        model="pirate_copy",
                        messages=[{"role": "user", "content": demo.DEMO_PROMPTS[i % 2]}],
                        **GREEDY,
                    )
                    for i in range(4)
                ]
            )

        answers = asyncio.run(ask_all())
        assert {a.choices[0].message.content for a in answers} == {demo.DEMO_SIGNATURES["pirate"]}
        samples = parse_metrics(httpx.get(f"{server.url}/metrics").text)
        name = "jaxlora_adapters_loaded_on_demand_total"
        assert metric(samples, name, outcome="loaded") == 1.0
        card = httpx.get(f"{server.url}/v1/models/robot_copy", headers=headers).json()
        assert card["parent"] == demo.DEMO_MODEL_NAME and card["id"] == "robot_copy"
        spellings = ("./robot_copy", "robot_copy/", "pirate_copy/../robot_copy", "a//robot_copy")
        for missing in (
            "../outside",
            "link_out",
            "does_not_exist",
            outside,
            "pirate_copy/..",
            *spellings,
        ):
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": missing, "prompt": "Hi", "max_tokens": 2},
                headers=headers,
            )
            assert response.status_code == 404, (missing, response.text)
            assert response.json()["error"]["param"] == "model"
        for broken, reason in (("pickled", "pickle"), ("broken_config", "adapter_config.json")):
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": broken, "prompt": "Hi", "max_tokens": 2},
                headers=headers,
            )
            assert response.status_code == 400, (broken, response.text)
            error = response.json()["error"]
            assert error["param"] == "model" and reason in error["message"], error
        samples = parse_metrics(httpx.get(f"{server.url}/metrics").text)
        assert metric(samples, name, outcome="loaded") == 2.0
        assert metric(samples, name, outcome="failed") == 2.0
        # LoRAX names a local adapter by its absolute path: inside a root, it is that adapter.
        for adapter_id, status in (
            (os.path.join(root, "robot_copy"), 200),
            (os.path.join(root, "pirate_copy", "..", "robot_copy"), 200),
            (os.path.join(root, "..", "outside"), 404),
            (outside, 404),
        ):
            response = httpx.post(
                f"{server.url}/generate",
                json={
                    "inputs": "Hi",
                    "parameters": {"adapter_id": adapter_id, "adapter_source": "local"},
                },
                headers=headers,
            )
            assert response.status_code == status, (adapter_id, response.text)
            if status == 200:
                assert response.json()["generated_text"].startswith(" BEEP BOOP")
            else:  # (the LoRAX routes answer in TGI's shape: the field opens the message)
                assert response.json()["error"].startswith("parameters.adapter_id: ")
        # Unloaded, it loads again on the next request.
        assert unload(server.url, "pirate_copy").status_code == 200
        again = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "pirate_copy", "prompt": "Hi", **GREEDY},
            headers=headers,
        )
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == (
            " " + demo.DEMO_SIGNATURES["pirate"]
        )
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="load_adapters_on_demand.*adapter_roots"):
        ServerConfig(model_name="m", load_adapters_on_demand=True)


def test_load_and_unload_at_runtime_while_other_requests_stream(served, client, aclient_factory):
    url = served[0].url
    state = served[1]
    long_run = {"temperature": 0, "max_tokens": 80, "extra_body": {"ignore_eos": True}}

    async def stream_text(aclient, model, started: asyncio.Event | None = None):
        text = ""
        async for chunk in await aclient.completions.create(
            model=model, prompt="Keep going", stream=True, **long_run
        ):
            text += chunk.choices[0].text if chunk.choices else ""
            if started is not None:
                started.set()
        return text

    async def scenario():
        aclient = aclient_factory()
        async with aclient:
            started = asyncio.Event()
            streams = [
                asyncio.create_task(stream_text(aclient, m, started))
                for m in ("poet", BASE, "robot")
            ]
            await started.wait()
            loaded = await asyncio.to_thread(load, url, "pirate_runtime", "pirate_copy")
            assert loaded.status_code == 200, loaded.text
            # The new adapter serves at once, while the others keep streaming.
            runtime_stream = asyncio.create_task(stream_text(aclient, "pirate_runtime"))
            answer = await aclient.chat.completions.create(
                model="pirate_runtime",
                messages=[{"role": "user", "content": "Who are you?"}],
                temperature=0,
                max_tokens=40,
            )
            assert answer.choices[0].message.content == demo.DEMO_SIGNATURES["pirate"]
            # Unloading it while its own stream runs: the stream finishes with its weights.
            unloaded = await asyncio.to_thread(unload, url, "pirate_runtime")
            assert unloaded.status_code == 200, unloaded.text
            texts = await asyncio.gather(*streams, runtime_stream)
        return texts

    texts = asyncio.run(scenario())
    for model, text in zip(("poet", BASE, "robot", "pirate"), texts, strict=True):
        alone = client.completions.create(model=model, prompt="Keep going", **long_run)
        assert text == alone.choices[0].text, model
    expect_error(404, lambda: chat(client, "pirate_runtime"), "pirate_runtime")
    assert wait_until(lambda: engine_idle(state))
    assert all(r.name != "pirate_runtime" for r in state.adapters.residents())

    replaced = load(url, "swap", "pirate_copy")
    assert replaced.status_code == 200
    assert chat(client, "swap").choices[0].message.content == demo.DEMO_SIGNATURES["pirate"]
    assert load(url, "swap", "robot_copy", load_inplace=True).status_code == 200
    assert chat(client, "swap").choices[0].message.content == demo.DEMO_SIGNATURES["robot"]
    assert unload(url, "swap").status_code == 200


# ---------------------------------------------------------------------------- metrics


def test_metrics_are_valid_prometheus_text_and_move(served, client):
    url = served[0].url
    before = parse_metrics(httpx.get(f"{url}/metrics").text)
    for _ in range(3):
        chat(client, "poet")
    client.completions.create(model=BASE, prompt="Hi", **GREEDY)
    expect_error(404, lambda: chat(client, "nobody"))
    after = parse_metrics(httpx.get(f"{url}/metrics").text)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("jaxlora_requests_total", model="poet") == 3
    assert moved("jaxlora_requests_finished_total", model="poet", finish_reason="stop") == 3
    assert moved("jaxlora_requests_total", model=BASE) == 1
    poet_tokens = len(served[1].tokenizer.encode(demo.DEMO_SIGNATURES["poet"], add_bos=False))
    assert moved("jaxlora_generation_tokens_total", model="poet") == 3 * (poet_tokens + 1)
    assert moved("jaxlora_prompt_tokens_total", model="poet") > 0
    assert moved("jaxlora_time_to_first_token_seconds_count") == 4
    assert moved("jaxlora_time_per_output_token_seconds_count") == 4
    assert moved("jaxlora_http_responses_total", route="/v1/chat/completions", status="404") == 1
    assert moved("jaxlora_adapter_hits_total") >= 2
    assert metric(after, "jaxlora_kv_cache_pages_total") == 96
    assert metric(after, "jaxlora_kv_cache_pages_free") <= 96
    # Prefix caching is off in this server: nothing registered, no prompt token from a cache.
    assert metric(after, "jaxlora_kv_cache_pages_cached") == 0
    assert ("jaxlora_prefix_cache_hit_tokens_total", frozenset()) in after
    assert metric(after, "jaxlora_prefix_cache_hit_tokens_total") == 0
    assert metric(after, "jaxlora_shared_prompt_tokens_total") == (
        served[1].engine.stats.shared_prompt_tokens
    )
    assert metric(after, "jaxlora_adapters_registered") >= 3
    # The poet adapter was loaded at least once (more with the module's other tests first).
    assert metric(after, "jaxlora_adapter_misses_total") >= 1
    assert metric(after, "jaxlora_adapter_load_seconds", adapter="poet") > 0
    assert metric(after, "jaxlora_adapter_pool_pages_total", pool="embed") == 48
    assert metric(after, "jaxlora_engine_ready") == 1
    for phase in ("schedule", "build", "dispatch", "wait", "append"):
        assert moved("jaxlora_engine_host_seconds_total", phase=phase) > 0, phase
        # (the engine thread's CPU in the phase: at most its wall time)
        cpu = moved("jaxlora_engine_host_cpu_seconds_total", phase=phase)
        assert 0 <= cpu <= moved("jaxlora_engine_host_seconds_total", phase=phase) + 1e-3, phase
    assert moved("jaxlora_engine_host_cpu_seconds_total", phase="build") > 0
    assert ("jaxlora_num_requests_waiting", frozenset()) in after
    # Each finished request's phases and sizes (vLLM's histograms).
    for phase in ("queue", "prefill", "decode"):
        assert moved(f"jaxlora_request_{phase}_time_seconds_count") == 4, phase
    assert moved("jaxlora_request_prompt_tokens_sum") == sum(
        moved("jaxlora_prompt_tokens_total", model=m) for m in ("poet", BASE)
    )
    assert moved("jaxlora_request_generation_tokens_sum") == sum(
        moved("jaxlora_generation_tokens_total", model=m) for m in ("poet", BASE)
    )
    # Token buckets run 1, 2, 5, 10, ... up to the first at or above the context length.
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in after
        if name == "jaxlora_request_prompt_tokens_bucket"
    )
    context = served[1].max_model_len
    assert bounds[:4] == [1, 2, 5, 10] and bounds[-1] == float("inf")
    assert bounds[-3] < context <= bounds[-2]
    assert re.fullmatch("[125]0*", str(int(bounds[-2])))
    # Idle: no model has a waiting or running request; the policies' gauges only under them.
    names = {name for name, _ in after}
    assert not {"jaxlora_model_requests_waiting", "jaxlora_model_requests_running"} & names
    assert not {"jaxlora_requests_waiting_by_priority", "jaxlora_fair_share_service"} & names


def test_metrics_show_each_models_queue_and_its_fair_share(served, client, monkeypatch):
    """Per-model waiting and running requests (read while the engine holds them), and under
    --scheduling_policy=fair each model's service counter; under "priority" the queue per
    priority."""
    state = served[1]
    engine = state.engine
    url = served[0].url
    monkeypatch.setattr(
        engine, "engine_config", dataclasses.replace(engine.engine_config, scheduling_policy="fair")
    )
    chat(client, "poet")
    fair = parse_metrics(httpx.get(f"{url}/metrics").text)
    served_poet = engine.queue_snapshot().fair_service["poet"]
    assert metric(fair, "jaxlora_fair_share_service", tenant="poet") == served_poet > 0
    # A queue seen at scrape time: the engine's thread is held off while requests are queued.
    with engine._lock:
        queued = [
            engine.submit([5, 6, 7], SamplingParams(max_tokens=2), adapter=a)
            for a in ("poet", "poet", None)
        ]
        text = state.metrics_text()
        monkeypatch.setattr(
            engine,
            "engine_config",
            dataclasses.replace(engine.engine_config, scheduling_policy="priority"),
        )
        ranked = parse_metrics(state.metrics_text())
    seen = parse_metrics(text)
    assert metric(seen, "jaxlora_model_requests_waiting", model="poet") == 2
    assert metric(seen, "jaxlora_model_requests_waiting", model=BASE) == 1
    assert metric(ranked, "jaxlora_requests_waiting_by_priority", priority="0") == 3
    assert "jaxlora_fair_share_service" not in {name for name, _ in ranked}
    assert wait_until(lambda: all(r.finish_reason is not None for r in queued))


# ---------------------------------------------------------------------------- pieces


def test_adapter_paths_resolve_inside_the_roots_only(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret", target_is_directory=True)
    roots = (str(root),)
    assert resolve_adapter_path("a/b", roots) == str((root / "a" / "b").resolve())
    assert resolve_adapter_path(str(root / "a"), roots) == str((root / "a").resolve())
    for bad in (
        "../secret",
        str(tmp_path / "secret"),
        "escape",
        "a/../../secret",
        "/etc",
        "a\x00b",
        "",
    ):
        with pytest.raises(AdapterError):
            resolve_adapter_path(bad, roots)
    with pytest.raises(AdapterError, match="disabled"):
        resolve_adapter_path("a", ())
    # A sibling whose name merely starts with the root's name is outside it.
    (tmp_path / "root2").mkdir()
    with pytest.raises(AdapterError):
        resolve_adapter_path(str(tmp_path / "root2"), roots)


def test_launch_settings():
    assert parse_lora_modules(["sql=/a/sql", "/b/chat/"]) == {"sql": "/a/sql", "chat": "/b/chat/"}
    from jaxlora.errors import ConfigError

    with pytest.raises(ConfigError, match="twice"):
        parse_lora_modules(["x=/a", "x=/b"])
    with pytest.raises(ConfigError, match="name=path"):
        parse_lora_modules(["=/a"])
    from configs.models import LLAMA3_8B, TINY

    cpu = engine_config_for(TINY, LaunchConfig(), backend="cpu")
    assert cpu.runner.max_batch == 8 and cpu.runner.max_prefill_rows == 1
    assert cpu.kv.max_model_len == 512
    gpu = engine_config_for(LLAMA3_8B, LaunchConfig(max_batch=64), backend="gpu")
    assert gpu.runner.max_batch == 64 and gpu.kv.max_model_len == 4096
    assert gpu.kv.num_pages * gpu.kv.page_size >= 32 * 4096
    assert cpu.async_scheduling and gpu.async_scheduling
    assert not cpu.kv.prefix_caching
    assert cpu.kv.cache_dtype == gpu.kv.cache_dtype == "auto"
    fp8 = engine_config_for(LLAMA3_8B, LaunchConfig(kv_cache_dtype="fp8"), backend="gpu").kv
    # (the default page count comes from the batch and context, not from bytes: unchanged)
    auto = engine_config_for(LLAMA3_8B, LaunchConfig(), backend="gpu").kv
    assert fp8 == dataclasses.replace(auto, cache_dtype="fp8")
    with pytest.raises(ConfigError, match="kv cache config field cache_dtype: expected one of"):
        engine_config_for(TINY, LaunchConfig(kv_cache_dtype="int8"), backend="cpu")
    assert engine_config_for(
        TINY, LaunchConfig(enable_prefix_caching=True), backend="cpu"
    ).kv.prefix_caching
    assert not engine_config_for(
        TINY, LaunchConfig(async_scheduling=False), backend="cpu"
    ).async_scheduling
    assert cpu.scheduling_policy == "fcfs"
    assert (
        engine_config_for(
            TINY, LaunchConfig(scheduling_policy="priority"), backend="cpu"
        ).scheduling_policy
        == "priority"
    )
    weights = parse_fair_share_weights(["pirate=4", " jaxlora-demo = 0.5"])
    fair = LaunchConfig(scheduling_policy="fair", fair_share_weights=weights)
    # (by served name: the base model's is the engine's tenant "")
    assert engine_config_for(TINY, fair, backend="cpu").fair_share_weights == (
        ("pirate", 4.0),
        ("", 0.5),
    )
    for bad in (["pirate"], ["=2"], ["pirate=lots"]):
        with pytest.raises(ConfigError, match="expected name=weight"):
            parse_fair_share_weights(bad)
    for bad_weights, needle in (
        ((("pirate", -1.0),), "finite number > 0"),
        ((("pirate", 2.0), ("pirate", 3.0)), "weighted twice"),
    ):
        with pytest.raises(ConfigError, match=needle):
            engine_config_for(
                TINY, dataclasses.replace(fair, fair_share_weights=bad_weights), backend="cpu"
            )
    by_key = dataclasses.replace(fair, fair_share_by="key")  # (names are keys': kept)
    assert engine_config_for(TINY, by_key, backend="cpu").fair_share_weights == weights
    with pytest.raises(ConfigError, match="needs scheduling_policy 'fair'"):
        engine_config_for(TINY, LaunchConfig(fair_share_weights=(("pirate", 2.0),)), backend="cpu")
    assert cpu.runner.fuse_projections and gpu.runner.fuse_projections
    assert not engine_config_for(
        TINY, LaunchConfig(fuse_projections=False), backend="cpu"
    ).runner.fuse_projections
    assert cpu.runner.projection_kernel == "auto"
    assert (
        engine_config_for(
            TINY, LaunchConfig(projection_kernel="pallas"), backend="gpu"
        ).runner.projection_kernel
        == "pallas"
    )
    with pytest.raises(ConfigError, match="projection_kernel"):
        engine_config_for(TINY, LaunchConfig(projection_kernel="cublas"), backend="cpu")
    # The kernels' tuning (serve.py --sgmv_config / --matmul_config) reaches the runner.
    from pallas_kernels.lora_matmul import MatmulConfig
    from pallas_kernels.sgmv import SgmvConfig

    assert cpu.runner.sgmv is None and cpu.runner.matmul is None
    tuned = engine_config_for(
        TINY,
        LaunchConfig(sgmv=SgmvConfig(decode_max_tokens=32), matmul=MatmulConfig(max_tokens=64)),
        backend="gpu",
    ).runner
    assert tuned.sgmv.decode_max_tokens == 32 and tuned.matmul.max_tokens == 64
    assert cpu.runner.kv_write == "pallas" and cpu.runner.scan_unroll is None
    forced = engine_config_for(TINY, LaunchConfig(kv_write="xla", scan_unroll=3), backend="gpu")
    assert forced.runner.kv_write == "xla" and forced.runner.scan_unroll == 3
    # serve.py --deterministic (the default): the shrink's split summed in one order;
    # --nodeterministic: atomic adds.
    assert cpu.runner.deterministic and cpu.runner.sgmv_config().deterministic
    atomic = engine_config_for(TINY, LaunchConfig(deterministic=False), backend="gpu").runner
    assert not atomic.deterministic and not atomic.sgmv_config().deterministic
    with pytest.raises(ConfigError, match="max_model_len 4096: the model's context is 512"):
        engine_config_for(TINY, LaunchConfig(max_model_len=4096), backend="cpu")
    # YaRN stretches the context past max_position_embeddings (Qwen3's x4: 32768 -> 131072,
    # config.json keeping 40960), as vLLM derives it; a linear x2 doubles it.
    yarn = dataclasses.replace(
        TINY,
        max_position_embeddings=640,
        rope_scaling=RopeScaling(4.0, original_max_position_embeddings=512, rope_type="yarn"),
    )
    assert yarn.context_length == 2048
    stretched = engine_config_for(yarn, LaunchConfig(max_model_len=2048), backend="cpu")
    assert stretched.kv.max_model_len == 2048
    with pytest.raises(
        ConfigError,
        match=r"max_model_len 4096: the model's context is 2048 \(max_position_embeddings 640, "
        r"yarn RoPE scaling x4\)",
    ):
        engine_config_for(yarn, LaunchConfig(max_model_len=4096), backend="cpu")
    linear = dataclasses.replace(TINY, rope_scaling=RopeScaling(2.0, rope_type="linear"))
    assert linear.context_length == 1024
    with pytest.raises(ConfigError, match="max_body_mib: expected an int >= 1, got 0"):
        LaunchConfig(max_body_mib=0)


@pytest.mark.parametrize("flag", SIZE_FIELDS)
@pytest.mark.parametrize("value", ["0", "-16"])
def test_sizes_below_one_are_refused_naming_the_flag(flag, value):
    """serve.py's sizes are ints >= 1: --page_size=0 was a ZeroDivisionError, -16 with
    --gpu_memory_utilization "-8910960 KV pages of -8192 bytes", and --prefill_chunk=0 an
    IndexError in the first step, --max_num_tokens=0 or --max_prefill_rows=0 requests that
    never ran."""
    from absl import flags

    from jaxlora import launch_flags

    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["serve.py", f"--{flag}={value}"])
        with pytest.raises(ConfigError, match=f"^--{flag}: expected an int >= 1, got {value}$"):
            launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()


def test_engine_sizes_below_one_are_refused_by_the_configs():
    """The library's configs refuse them too (a config built without serve.py's flags)."""
    from jaxlora.engine import EngineConfig, RunnerConfig

    for field in ("max_batch", "prefill_chunk", "max_prefill_rows"):
        with pytest.raises(ConfigError, match=f"'{field}': expected a positive int, got 0"):
            RunnerConfig(**{field: 0})
    with pytest.raises(ConfigError, match="'max_num_tokens': expected a positive int, got 0"):
        EngineConfig(max_num_tokens=0)


def test_prefill_key_block_flag_reaches_the_runner():
    """--prefill_key_block (RunnerConfig.prefill_key_block): unset keeps the runner's 4096,
    0 is one pass over the page table, else the block; a negative one names the field."""
    from configs.models import TINY

    launches = launch_configs_of("prefill_key_block", (None, "0", "256"))
    blocks = {
        value: engine_config_for(TINY, launch, backend="cpu").runner.prefill_key_block
        for value, launch in launches.items()
    }
    assert blocks == {None: 4096, "0": None, "256": 256}
    with pytest.raises(ConfigError, match="'prefill_key_block': expected a positive int, got -1"):
        engine_config_for(TINY, LaunchConfig(prefill_key_block=-1), backend="cpu")


def test_prefill_context_buckets_flag_reaches_the_runner():
    """--prefill_context_buckets (RunnerConfig.prefill_context_buckets): unset keeps the
    runner's (512, 2048, 4096, ..., 65536), empty is none, a list is its buckets sorted; a bad
    item names the flag."""
    from configs.models import TINY

    launches = launch_configs_of("prefill_context_buckets", (None, "", "1024,512"))
    buckets = {
        value: engine_config_for(TINY, launch, backend="cpu").runner.prefill_context_buckets
        for value, launch in launches.items()
    }
    assert buckets == {
        None: (512, 2048, 4096, 8192, 16384, 32768, 65536),
        "": (),
        "1024,512": (512, 1024),
    }
    for bad in ("512,x", "0", "-4"):
        with pytest.raises(ConfigError, match="--prefill_context_buckets: expected positive"):
            launch_configs_of("prefill_context_buckets", (bad,))


def test_prefill_attention_flag_reaches_the_runner_and_is_checked():
    """--prefill_attention (RunnerConfig.prefill_attention): auto unless set; xla and cudnn
    reach the runner; another value names the field."""
    from configs.models import TINY
    from jaxlora.engine import RunnerConfig

    launches = launch_configs_of("prefill_attention", (None, "xla", "cudnn"))
    chosen = {
        value: engine_config_for(TINY, launch, backend="gpu").runner.prefill_attention
        for value, launch in launches.items()
    }
    assert chosen == {None: "auto", "xla": "xla", "cudnn": "cudnn"}
    with pytest.raises(ConfigError, match="prefill_attention: expected one of .*'flash'"):
        RunnerConfig(prefill_attention="flash")


def test_adapter_pool_axis_pages_flag_reaches_the_pools():
    """--adapter_pool_axis_pages=mlp=2,heads=4: those pools' pages, the others
    --adapter_pool_pages' (tests/test_device_memory.py checks the entries and the memory)."""
    from absl import flags

    from configs.models import TINY
    from jaxlora import launch_flags

    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(
            ["serve.py", "--adapter_pool_pages=6", "--adapter_pool_axis_pages=mlp=2,heads=4"]
        )
        launch = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert launch.adapter_pool_axis_pages == ("mlp=2", "heads=4")
    pool = engine_config_for(TINY, launch, backend="cpu").lora_pool
    assert [pool.pages_in(a) for a in ("embed", "heads", "kv_heads", "mlp")] == [6, 4, 6, 2]


def test_enable_lora_flag_takes_vllms_spelling_and_noenable_lora_serves_no_adapter():
    """vLLM's --enable-lora carries over (on by default here); --noenable_lora reaches
    LaunchConfig, and the demo server built with it registers none of the demo's adapters."""
    from absl import flags

    from jaxlora import launch_flags
    from jaxlora.server.launch import build_state

    launches = {}
    try:
        for argv in (["serve.py"], ["serve.py", "--enable-lora"], ["serve.py", "--noenable_lora"]):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(launch_flags.vllm_spelling(argv))
            launches[argv[-1]] = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert launches["serve.py"].enable_lora and launches["--enable-lora"].enable_lora
    assert not launches["--noenable_lora"].enable_lora
    state = build_state(dataclasses.replace(launches["--noenable_lora"], kv_pages=16))
    try:
        assert state.llm.adapters.store.names() == []
        assert state.llm.engine_config.lora_pool.max_slots == 1
    finally:
        state.llm.stop()


def test_kv_cache_dtype_flag_reaches_the_engine_config():
    """--kv_cache_dtype (scripts/serve.py and scripts/run_batch.py, jaxlora.launch_flags):
    LaunchConfig's, then the engine's KVCacheConfig's; only vLLM's names parse."""
    from absl import flags

    from configs.models import TINY
    from jaxlora import launch_flags

    try:
        flags.FLAGS(["serve.py", "--kv_cache_dtype=fp8_e5m2"])
        launch = launch_flags.launch_config()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["serve.py"])
        default = launch_flags.launch_config()
        with pytest.raises(flags.IllegalFlagValueError, match="kv_cache_dtype"):
            flags.FLAGS(["serve.py", "--kv_cache_dtype=int8"])
    finally:
        flags.FLAGS.unparse_flags()
    assert launch.kv_cache_dtype == "fp8_e5m2" and default.kv_cache_dtype == "auto"
    from jaxlora.engine.kv_cache import KV_CACHE_DTYPES

    assert flags.FLAGS["kv_cache_dtype"].parser.enum_values == list(KV_CACHE_DTYPES)
    assert engine_config_for(TINY, launch, backend="cpu").kv.cache_dtype == "fp8_e5m2"


def test_kv_cache_memory_sizes_the_pages_by_the_cache_dtype():
    """--kv_cache_memory (LaunchConfig.kv_cache_memory_bytes, vLLM's --kv-cache-memory-bytes):
    the KV pages that fit in that many bytes on each device, at the cache dtype's bytes a page
    (an fp8 cache holds twice bf16's pages, tensor parallelism splits the heads); refused beside
    --kv_pages, below one sequence's pages, or unparsable, naming the flag."""
    from absl import flags

    from configs.models import LLAMA3_8B
    from jaxlora import launch_flags
    from jaxlora.errors import ConfigError
    from jaxlora.server.launch import kv_page_bytes

    gib = 2**30
    # llama-3-8b, bf16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB a token.
    bf16 = LaunchConfig(dtype="bfloat16", kv_cache_memory_bytes=20 * gib)
    assert kv_page_bytes(LLAMA3_8B, bf16, 16) == 16 * 128 * 2**10
    assert engine_config_for(LLAMA3_8B, bf16, backend="gpu").kv.num_pages == 10240
    fp8 = dataclasses.replace(bf16, kv_cache_dtype="fp8")
    assert engine_config_for(LLAMA3_8B, fp8, backend="gpu").kv.num_pages == 20480
    tp2 = dataclasses.replace(bf16, tensor_parallel_size=2)
    assert kv_page_bytes(LLAMA3_8B, tp2, 16) == 8 * 128 * 2**10
    with pytest.raises(ConfigError, match="one sequence of max_model_len 4096 needs 256"):
        engine_config_for(
            LLAMA3_8B, dataclasses.replace(bf16, kv_cache_memory_bytes=gib // 4), backend="gpu"
        )
    # A sliding window: a sequence holds its window's pages and one prefill chunk's, not its
    # whole context's (Mistral 7B v0.1 at 32k: 2 MiB a page, 1,024 pages in 2 GiB).
    from configs.models import MISTRAL_7B, MISTRAL_7B_V01

    long = dataclasses.replace(bf16, kv_cache_memory_bytes=2 * gib, max_model_len=32768)
    windowed = engine_config_for(MISTRAL_7B_V01, long, backend="gpu")
    chunk = windowed.runner.prefill_chunk
    assert windowed.kv.num_pages == 1024 and windowed.kv.max_model_len == 32768
    with pytest.raises(ConfigError, match="one sequence of max_model_len 32768 needs 2048"):
        engine_config_for(MISTRAL_7B, long, backend="gpu")
    sized = engine_config_for(
        MISTRAL_7B_V01, dataclasses.replace(long, kv_cache_memory_bytes=None), backend="gpu"
    )
    held = -(-(4096 - 1 + chunk) // 16) + 1
    assert sized.kv.num_pages == max(held, sized.runner.max_batch * held // 2)
    with pytest.raises(ConfigError, match="both size the KV cache: give one"):
        LaunchConfig(kv_pages=100, kv_cache_memory_bytes=gib)
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes: expected None or an int >= 1"):
        LaunchConfig(kv_cache_memory_bytes=0)
    parse = functools.partial(launch_flags.parse_bytes, flag="--kv_cache_memory")
    assert parse("20GiB") == 20 * gib and parse("16 gb") == 16 * 10**9
    assert parse("1.5GiB") == 3 * gib // 2 and parse("4096") == 4096
    for bad in ("", "lots", "20 GiBs", "-1GiB", "0"):
        with pytest.raises(ConfigError, match="--kv_cache_memory="):
            parse(bad)
    try:
        flags.FLAGS(["serve.py", "--kv_cache_memory=8GiB"])
        launch = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    assert launch.kv_cache_memory_bytes == 8 * gib and launch.kv_pages is None


def test_freeze_startup_objects_leaves_collections_what_comes_later():
    """serve.py freezes the objects alive once the server is warm: the garbage collector's
    generations then hold only what came after (a full collection scans those only)."""
    import gc

    from jaxlora.heap import freeze_startup_objects

    tracked = len(gc.get_objects())
    frozen = gc.get_freeze_count()
    try:
        assert freeze_startup_objects() >= 0
        assert gc.get_freeze_count() > frozen
        assert len(gc.get_objects()) < tracked // 2
        later = [object() for _ in range(3)]
        assert any(o is later for o in gc.get_objects())  # new objects are collected as before
    finally:
        gc.unfreeze()  # the other tests' objects stay collectable


def test_banner_has_a_curl_that_parses(served):
    text = banner(served[1], "http://127.0.0.1:8000")
    assert "http://127.0.0.1:8000/v1" in text
    curl = text[text.index("curl") :]
    payload = curl[curl.index("-d '") + 4 : curl.rindex("'")]
    body = json.loads(payload)
    assert body["model"] in demo.DEMO_SIGNATURES
    assert "Bearer $JAXLORA_API_KEY" in curl and API_KEY not in text  # the key is not printed


def test_health_is_503_until_the_engine_runs():
    from fastapi.testclient import TestClient

    from jaxlora.llm import LLM
    from jaxlora.server import ServerConfig, ServingState, create_app
    from tests.test_server_helpers import demo_engine_config

    config = dataclasses.replace(demo_engine_config(max_batch=1, max_waiting=1), warmup=False)
    llm = LLM(demo.model_dir(), engine_config=config)
    state = ServingState(llm, ServerConfig(model_name=BASE))
    http = TestClient(create_app(state, manage_engine=False))  # no lifespan: never started
    response = http.get("/health")
    assert response.status_code == 503 and "starting" in response.json()["status"]
    state.start()
    try:
        assert http.get("/health").json() == {"status": "ok"}
    finally:
        state.stop()

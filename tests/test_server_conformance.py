"""The answers' JSON as vLLM's OpenAI-compatible server writes it, field by field (raw HTTP, not
the openai client, which hides absent fields and nulls alike): stop_reason, the null fields of
a whole answer, echo with max_tokens 0, stream_options' defaults and continuous usage."""

import dataclasses
import json

import httpx
import pytest

from jaxlora import demo
from jaxlora.server.reasoning import REASONING_PARSERS, ReasoningFormat
from tests.test_server_helpers import API_KEY, start_demo_server

BASE = demo.DEMO_MODEL_NAME
PROMPT = demo.DEMO_PROMPTS[0]
MESSAGES = [{"role": "user", "content": PROMPT}]
GREEDY = {"model": BASE, "temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def served():
    server, state = start_demo_server(max_batch=4, max_waiting=32)
    yield server, state
    server.stop()


@pytest.fixture(scope="module")
def http(served):
    root = served[0].base_url.removesuffix("/v1")
    with httpx.Client(
        base_url=root, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:
        yield client


def post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def events(http, path: str, body: dict) -> list[dict]:
    """A streamed answer's chunks (the [DONE] that ends it checked and left out)."""
    response = http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_stop_reason_is_the_stop_string_or_token_that_ended_the_output(http):
    """vLLM's stop_reason: the stop string or stop token id that ended a choice, null where
    EOS or max_tokens did; in a stream, with the finish."""
    # EOS ends the demo's greedy answer: stop, no stop_reason
    whole = post(http, "/v1/completions", {**GREEDY, "prompt": PROMPT, "return_token_ids": True})
    [choice] = whole["choices"]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
    first_token = choice["token_ids"][0]
    cut = post(http, "/v1/completions", {**GREEDY, "prompt": PROMPT, "max_tokens": 2})
    assert (cut["choices"][0]["finish_reason"], cut["choices"][0]["stop_reason"]) == (
        "length",
        None,
    )
    # a stop string (of two found at the same place: the longer one, as the engine cut there)
    stops = {**GREEDY, "prompt": PROMPT, "stop": ["!", "ll", "llo"]}
    [choice] = post(http, "/v1/completions", stops)["choices"]
    assert (choice["text"], choice["stop_reason"]) == (" He", "llo")
    kept = post(http, "/v1/completions", {**stops, "include_stop_str_in_output": True})
    assert (kept["choices"][0]["text"], kept["choices"][0]["stop_reason"]) == (" Hello", "llo")
    # a stop token id
    by_token = {**GREEDY, "prompt": PROMPT, "stop_token_ids": [first_token]}
    [choice] = post(http, "/v1/completions", by_token)["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "",
        "stop",
        first_token,
    )
    # chat: whole and streamed (only the finish chunk has it, as vLLM's)
    chat = {**GREEDY, "messages": MESSAGES, "stop": "!"}
    [choice] = post(http, "/v1/chat/completions", chat)["choices"]
    assert (choice["message"]["content"], choice["stop_reason"]) == ("Hello", "!")
    chunks = events(http, "/v1/chat/completions", chat)
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert [c["stop_reason"] for c in choices if "stop_reason" in c] == ["!"]
    assert choices[-1]["finish_reason"] == "stop" and choices[-1]["delta"] == {}
    # completions stream: every choice has it (null until the finish); the two choices'
    # chunks interleave in the order their tokens came, so their finishes come in either order
    chunks = events(http, "/v1/completions", {**GREEDY, "prompt": PROMPT, "stop": "!", "n": 2})
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert sorted((c["index"], c["stop_reason"]) for c in choices if c["finish_reason"]) == [
        (0, "!"),
        (1, "!"),
    ]
    assert {c["stop_reason"] for c in choices if not c["finish_reason"]} == {None}


def test_whole_answers_have_vllms_null_fields(http):
    """service_tier, system_fingerprint and usage.prompt_tokens_details: null, not absent."""
    for path, body in (
        ("/v1/completions", {**GREEDY, "prompt": PROMPT}),
        ("/v1/chat/completions", {**GREEDY, "messages": MESSAGES}),
    ):
        answer = post(http, path, body)
        assert answer["service_tier"] is None and answer["system_fingerprint"] is None
        assert answer["usage"]["prompt_tokens_details"] is None
        usage = {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
        assert answer["usage"]["total_tokens"] == sum(usage.values())


def test_echo_with_max_tokens_zero_returns_the_prompt_and_its_logprobs(http):
    """OpenAI's legacy scoring request (echo, max_tokens 0, logprobs), as vLLM answers it: the
    prompt alone, its tokens' logprobs (the first's null), nothing generated returned;
    streamed the same in one chunk before the finish."""
    body = {"model": BASE, "prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1}
    whole = post(http, "/v1/completions", body)
    [choice] = whole["choices"]
    prompt_tokens = whole["usage"]["prompt_tokens"]
    assert choice["text"] == PROMPT
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == prompt_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp < 0 for lp in logprobs["token_logprobs"][1:])
    with_output = post(http, "/v1/completions", {**body, "max_tokens": 1})
    assert with_output["choices"][0]["text"].startswith(PROMPT)
    assert with_output["choices"][0]["logprobs"]["tokens"][:prompt_tokens] == logprobs["tokens"]

    chunks = events(http, "/v1/completions", body)
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["text"] for c in choices) == PROMPT
    streamed = [c["logprobs"] for c in choices if c["logprobs"]]
    assert [lp["tokens"] for lp in streamed] == [logprobs["tokens"]]
    assert choices[-1]["finish_reason"] == "length"
    # without echo, max_tokens 0 stays refused (as vLLM's)
    refused = http.post("/v1/completions", json={**body, "echo": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_stream_options_include_usage_is_true_unless_given_false(http):
    """vLLM's StreamOptions: include_usage defaults to true once stream_options is given, so
    {"continuous_usage_stats": true} alone streams the usage."""
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 4}
    chunks = events(http, "/v1/completions", {**body, "stream_options": {}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    chunks = events(
        http, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}}
    )
    assert all(c["usage"] is not None for c in chunks)
    off = {"include_usage": False, "continuous_usage_stats": True}
    chunks = events(http, "/v1/completions", {**body, "stream_options": off})
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_counts_the_choices_tokens_streamed_so_far(http, path):
    """continuous_usage_stats: each chunk's usage is its choice's tokens sent so far (the
    role chunk's none), as vLLM's, not the engine's count, which runs ahead of the stream."""
    body = {**GREEDY, "n": 2, "stream_options": {"include_usage": True}}
    body["stream_options"]["continuous_usage_stats"] = True
    if path == "/v1/completions":
        body.update(prompt=PROMPT, logprobs=0)
    else:
        body.update(messages=MESSAGES, logprobs=True)
    chunks = events(http, path, body)
    *per_choice, last = chunks
    sent = [0, 0]
    prompt_tokens = last["usage"]["prompt_tokens"]
    for chunk in per_choice:
        [choice] = chunk["choices"]
        logprobs = choice["logprobs"]
        if logprobs:
            sent[choice["index"]] += len(logprobs.get("content") or logprobs.get("tokens"))
        usage = chunk["usage"]
        assert usage["completion_tokens"] == sent[choice["index"]], chunk
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == sum(sent)


def test_reasoning_is_under_vllms_name_and_its_older_one(served, http, monkeypatch):
    """--reasoning_parser: vLLM's message.reasoning (and delta.reasoning), beside the older
    reasoning_content that clients of earlier vLLM read. The parser's tags are set to ones the
    pirate says ("Arr," opens, "!" ends)."""
    state = served[1]
    monkeypatch.setattr(
        state, "config", dataclasses.replace(state.config, reasoning_parser="qwen3")
    )
    monkeypatch.setitem(REASONING_PARSERS, "qwen3", ReasoningFormat("Arr,", "!", False))
    body = {**GREEDY, "model": "pirate", "messages": MESSAGES}
    message = post(http, "/v1/chat/completions", body)["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == " matey"
    deltas = [c["choices"][0]["delta"] for c in events(http, "/v1/chat/completions", body)]
    assert "".join(d.get("reasoning") or "" for d in deltas) == " matey"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]

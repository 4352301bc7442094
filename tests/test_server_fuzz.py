"""Malformed requests against the OpenAI-compatible server, sent as raw bytes (the openai client
checks types itself): each one gets a 4xx with an OpenAI-style JSON error naming the field and
what it expects, never a 500 or a hang, and the server keeps answering correctly afterwards.

Cases marked "was ..." misbehaved before the fixes they test."""

import collections
import json
import shutil
import threading
import time

import httpx
import pytest

from jaxlora import demo
from tests.test_server_helpers import (
    API_KEY,
    engine_idle,
    parse_metrics,
    start_demo_server,
    wait_until,
)

MAX_BODY = 1 << 20  # the served ServerConfig.max_body_bytes
PIRATE = " " + demo.DEMO_SIGNATURES["pirate"]

C = {"model": "pirate", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
M = {"model": "pirate", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
NAN, INF = float("nan"), float("inf")  # json.dumps writes the bare tokens NaN and Infinity


def comp(**fields):
    return {**C, **fields}


def chat(**fields):
    return {**M, **fields}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_adapters")
    shutil.copytree(demo.adapter_dirs()["pirate"], root / "pirate_copy")
    server, state = start_demo_server(
        max_batch=1, max_waiting=8, adapter_roots=(str(root),), max_body_bytes=MAX_BODY
    )
    yield server, state
    server.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(
        base_url=served[0].url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:
        yield client


def post(http, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"Content-Type": "application/json"}, **kw)


def check_error(response, status, param, *needles):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param"}, error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    for needle in needles:
        assert needle in error["message"], error


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
RESPONSES = "/v1/responses"
R = {"model": "pirate", "input": "Hi", "max_output_tokens": 4, "temperature": 0}
UNLOAD = "/v1/unload_lora_adapter"
INVOKE = "/invocations"  # (SageMaker's: routed by the body's messages / prompt / input)
GONE = object()  # a field left out of the body
PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def bad(base, field, value, *needles, status=400, param=None):
    """base (C or M) with field set to value (or left out): status, the error's param (the
    field unless given) and what its message must say."""
    body = {k: v for k, v in base.items() if k != field}
    if value is not GONE:
        body[field] = value
    path = CHAT if "messages" in base else COMPLETIONS
    shown = "gone" if value is GONE else json.dumps(value)
    shown = shown if len(shown) <= 24 else f"{shown[:12]}..{len(shown)}"
    case_id = f"{path.removeprefix('/v1/')}-{field}={shown}"
    return pytest.param(path, body, status, param or field, needles, id=case_id)


def raw(path, body, case_id, param, *needles, status=400):
    """A body (bytes or an object) as it is."""
    return pytest.param(path, body, status, param, needles, id=case_id)


USER_HI = {"role": "user", "content": "Hi"}
TOO_LONG = "x" * 200_000  # tokens of at most 13 characters: far past 128 of them

CASES = [
    # ---------------------------------------------------------------- sampling fields
    bad(C, "max_tokens", "5", "valid integer", 'got "5"'),  # was 200
    bad(C, "max_tokens", True, "valid integer"),  # was 200
    bad(C, "max_tokens", 5.5, "valid integer"),
    bad(C, "max_tokens", -1, ">= 1"),
    bad(C, "max_tokens", 10**30, "context length"),
    bad(M, "max_tokens", 0, ">= 1"),
    bad(M, "max_completion_tokens", "5", "valid integer"),  # was 200
    bad(C, "n", True, "valid integer"),  # was 200
    bad(C, "n", "2", "valid integer"),  # was 200
    bad(C, "n", 0, "1..16"),
    bad(C, "n", -1, "1..16"),
    bad(M, "n", 10**30, "1..16"),
    bad(M, "n", "2", "valid integer"),  # was 200
    bad(C, "temperature", "hot", "valid number"),
    bad(C, "temperature", True, "valid number"),  # was 200
    bad(C, "temperature", NAN, "finite number"),
    bad(M, "temperature", INF, "finite number"),
    bad(M, "temperature", -INF, "finite number"),
    bad(M, "temperature", 1e300, "3.4e38"),  # was 200: infinity in float32, uniform sampling
    bad(C, "top_p", NAN, "(0, 1]"),
    bad(C, "top_p", 0, "(0, 1]"),
    bad(M, "top_p", INF, "(0, 1]"),
    bad(C, "top_p", "x", "valid number"),
    bad(C, "top_k", -5, ">= 0"),
    bad(C, "top_k", 1.5, "valid integer"),
    bad(M, "top_k", "3", "valid integer"),  # was 200
    bad(C, "seed", -(2**70), "2**63"),
    bad(C, "seed", 2**70, "2**63"),
    bad(M, "seed", "x", "valid integer"),
    bad(M, "seed", True, "valid integer"),  # was 200
    bad(C, "presence_penalty", NAN, "[-2, 2]"),
    bad(M, "frequency_penalty", INF, "[-2, 2]"),
    bad(M, "frequency_penalty", 2.5, "[-2, 2]"),
    bad(C, "presence_penalty", "1", "valid number"),
    bad(C, "repetition_penalty", 0, "> 0"),
    bad(M, "repetition_penalty", -INF, "> 0"),
    bad(C, "min_p", 1.5, "[0, 1]"),
    bad(M, "min_p", NAN, "[0, 1]"),
    bad(C, "min_tokens", 5, "0..max_tokens (4)"),
    bad(M, "min_tokens", -1, "0..max_tokens"),
    bad(M, "min_tokens", 1.5, "valid integer"),
    bad(C, "logit_bias", {"1": "x"}, "valid number", param="logit_bias.1"),
    bad(C, "logit_bias", {"one": 1}, "token ids", "'one'"),
    bad(M, "logit_bias", {"-3": 1}, "token ids"),
    bad(C, "logit_bias", {"12345678901": 1}, "token ids"),
    bad(C, "logit_bias", {"5": "x"}, "valid number", param="logit_bias.5"),
    bad(M, "logit_bias", {"5": NAN}, "[-100, 100]"),
    bad(C, "logit_bias", {"70000": 1}, "token id 70000", "vocabulary"),
    bad(M, "logit_bias", {str(i): 1 for i in range(1025)}, "at most 1024"),
    bad(C, "stop", 5, "a string or a list of strings", "got 5"),  # was "stop.str: ..."
    bad(C, "stop", [1, 2], "a string or a list of strings"),  # ditto
    bad(M, "stop", [None], "a string or a list of strings"),  # ditto
    bad(C, "stop", ["", "a"], "non-empty"),
    bad(M, "stop", "", "non-empty"),
    bad(C, "stop", "\ud800", "lone surrogate"),  # was 200
    # was accepted: each stop string is matched on the engine's thread, which all requests share
    bad(C, "stop", [f"s{i}" for i in range(65)], "at most 64", "got 65"),
    bad(C, "stop_token_ids", [True], "valid integer", param="stop_token_ids[0]"),  # was 200
    bad(C, "stop_token_ids", [-1], ">= 0"),
    bad(M, "stop_token_ids", 5, "valid list"),
    bad(C, "logprobs", True, "valid integer"),  # was 200
    bad(C, "logprobs", "2", "valid integer"),  # was 200
    bad(C, "logprobs", 1000, "0..20"),
    bad(C, "logprobs", -1, "0..20"),
    bad(M, "logprobs", "yes", "valid boolean"),  # was 200
    bad({**M, "logprobs": True}, "top_logprobs", 1000, "0..20"),
    bad({**M, "logprobs": True}, "top_logprobs", True, "valid integer"),  # was 200
    bad(C, "echo", "yes", "valid boolean"),
    bad(C, "ignore_eos", "yes", "valid boolean"),  # was 200
    bad(C, "include_stop_str_in_output", "yes", "valid boolean"),
    bad(C, "stream", "yes", "valid boolean"),  # was 200 (and streamed)
    bad(M, "stream", 1, "valid boolean"),  # was 200 (and streamed)
    bad({**C, "stream": True}, "top_p", 2, "(0, 1]"),
    bad(C, "stream_options", {"include_usage": True}, "stream=true"),  # was 200
    bad(M, "stream_options", {"include_usage": True}, "stream=true"),  # was 200
    bad({**M, "stream": True}, "stream_options", "x", "valid dictionary"),
    # was 200
    bad(
        {**M, "stream": True},
        "stream_options",
        {"include_usage": "yes"},
        "valid boolean",
        param="stream_options.include_usage",
    ),
    bad(C, "best_of", 0, "equal to n"),
    bad(C, "suffix", 5, "valid string"),
    bad(C, "user", 5, "valid string"),
    bad(C, "frobnicate", 1, "unknown field"),
    # ---------------------------------------------------------------- model
    bad(C, "model", GONE, "Field required"),
    bad(C, "model", 5, "valid string"),
    bad(M, "model", "", "does not exist", status=404),
    bad(C, "model", "\ud800", "lone surrogate"),  # was 500
    # ---------------------------------------------------------------- prompt
    bad(C, "prompt", GONE, "Field required"),
    bad(C, "prompt", 5, PROMPT_TYPES, "got 5"),  # was "prompt.str: ... (and 3 more problems)"
    bad(C, "prompt", None, PROMPT_TYPES, "got null"),  # ditto
    bad(C, "prompt", {"a": 1}, PROMPT_TYPES),  # ditto
    bad(C, "prompt", [[1, [2]]], PROMPT_TYPES),  # ditto
    bad(C, "prompt", [1, "a"], PROMPT_TYPES),  # ditto
    bad(C, "prompt", [True], PROMPT_TYPES),  # was 200
    bad(C, "prompt", [1.5], PROMPT_TYPES),
    bad(C, "prompt", [], "at least one prompt"),
    bad(C, "prompt", [-1], "vocabulary"),
    bad(C, "prompt", [[2**70]], "vocabulary"),
    bad(C, "prompt", ["x"] * 17, "17 prompts", param="n"),
    # was tokenized on the event loop: 50 MB of it held every request up for ~100 s
    bad(C, "prompt", TOO_LONG, "200000 characters", "context length"),
    bad(C, "prompt", list(range(100)) * 50, "5000 tokens", "context length"),
    bad(C, "prompt", "\ud800", "lone surrogate"),  # was 500
    bad(C, "prompt", ["ok", "a\udfff"], "prompt[1]", "lone surrogate"),  # was 500
    # ---------------------------------------------------------------- messages
    bad(M, "messages", GONE, "Field required"),
    bad(M, "messages", "hi", "valid list"),
    bad(M, "messages", [], "non-empty"),
    bad(M, "messages", ["hi"], "valid dictionary", param="messages[0]"),
    # was 200
    bad(M, "messages", [{"role": "user"}], "only assistant", param="messages[0].content"),
    # was "messages.0.content.str: ..."
    bad(
        M,
        "messages",
        [{"role": "user", "content": 5}],
        "a string or a list of content parts",
        param="messages[0].content",
    ),
    bad(
        M,
        "messages",
        [{"role": "user", "content": ["hi"]}],
        "a list of content parts",
        param="messages[0].content",
    ),
    bad(M, "messages", [{"content": "hi"}], "Field required", param="messages[0].role"),
    bad(M, "messages", [{"role": 5, "content": "hi"}], "valid string", param="messages[0].role"),
    bad(M, "messages", [{"role": "", "content": "hi"}], "not one of", param="messages[0].role"),
    # param was null
    bad(
        M,
        "messages",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        "only text parts",
        param="messages[0].content",
    ),
    bad(
        M,
        "messages",
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        "only text parts",
        param="messages[0].content",
    ),
    bad(M, "messages", [{**USER_HI, "name": 5}], "valid string", param="messages[0].name"),
    bad(M, "messages", [{"role": "user", "content": "\ud800"}], "lone surrogate"),  # was 500
    # was 500
    bad(
        M,
        "messages",
        [USER_HI, {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
        "messages[1].content[0].text",
        "lone surrogate",
    ),
    bad(M, "messages", [{"role": "user", "content": TOO_LONG}], "200000 characters"),
    bad(M, "response_format", "json", "valid dictionary"),
    bad(M, "response_format", {"type": 5}, "valid string", param="response_format.type"),
    bad(M, "tool_choice", 5, "a string or an object"),  # was "tool_choice.str: ..."
    # ---------------------------------------------------------------- structured outputs
    bad(M, "response_format", {"type": "yaml"}, "'text', 'json_object' or 'json_schema'"),
    bad(M, "response_format", {"type": "json_schema"}, "{'name': ..., 'schema': {...}}"),
    bad(
        M,
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        "does not compile",
    ),
    bad(
        C,
        "response_format",
        {"type": "json_schema", "json_schema": []},
        "valid dictionary",
        param="response_format.json_schema",
    ),
    bad(C, "structured_outputs", {}, "exactly one of", "got none"),
    bad(C, "structured_outputs", {"regex": "a", "choice": ["a"]}, "['choice', 'regex']"),
    bad(C, "structured_outputs", {"regex": "[a-"}, "structured_outputs.regex", "does not compile"),
    bad(C, "structured_outputs", {"choice": []}, "a list of 1..1024 non-empty strings"),
    bad(C, "structured_outputs", {"json": "{not json"}, "not valid JSON"),
    bad(C, "structured_outputs", {"grammar": "start: ("}, "structured_outputs.grammar"),
    bad(C, "structured_outputs", {"yaml": "a"}, "unknown field", param="structured_outputs.yaml"),
    bad(
        C,
        "structured_outputs",
        {"json": 5},
        "an object or a string",
        param="structured_outputs.json",
    ),
    bad(C, "guided_regex", "(", "guided_regex", "does not compile"),
    bad(C, "guided_choice", ["a", 5], "valid string", param="guided_choice[1]"),
    bad(C, "guided_json", [1], "an object or a string"),
    raw(
        COMPLETIONS,
        {**C, "guided_regex": "a", "structured_outputs": {"choice": ["a"]}},
        "two-constraints",
        "guided_regex",
        "structured_outputs.choice, guided_regex: expected at most one constraint",
    ),
    bad(C, "prompt_logprobs", 21, "0..20"),
    bad(C, "prompt_logprobs", -1, "0..20"),
    bad(M, "prompt_logprobs", "2", "valid integer"),
    bad(C, "bad_words", "matey", "valid list"),
    bad(C, "priority", 1, "needs the 'priority' scheduling policy", "expected 0"),
    bad(M, "priority", "1", "valid integer"),
    bad(C, "bad_words", ["ok", 5], "valid string", param="bad_words[1]"),
    bad(M, "bad_words", ["ok", "  "], "at most 256 words (non-blank strings)"),
    bad(C, "bad_words", ["w"] * 257, "at most 256 words"),
    bad(C, "allowed_token_ids", [], "a non-empty list of token ids"),
    bad(M, "allowed_token_ids", [3, -1], "a non-empty list of token ids >= 0"),
    bad(C, "allowed_token_ids", [3, 10**6], "outside the vocabulary"),
    bad(C, "allowed_token_ids", ["3"], "valid integer", param="allowed_token_ids[0]"),
    bad(M, "skip_special_tokens", "false", "valid boolean"),
    bad(C, "truncate_prompt_tokens", 0, "an int >= 1, or -1"),
    bad(M, "truncate_prompt_tokens", -5, "an int >= 1, or -1"),
    bad(C, "truncate_prompt_tokens", "3", "valid integer"),
    bad(M, "add_generation_prompt", "no", "valid boolean"),
    bad(M, "include_reasoning", 1, "valid boolean"),
    bad(M, "chat_template_kwargs", ["think"], "valid dictionary"),
    bad(
        M,
        "chat_template_kwargs",
        {"messages": []},
        "sets this template variable itself",
        param="chat_template_kwargs.messages",
    ),
    raw(
        CHAT,
        {**M, "continue_final_message": True, "add_generation_prompt": True},
        "continue-and-generation-prompt",
        "continue_final_message",
        "set add_generation_prompt to false",
    ),
    raw(
        CHAT,
        {**M, "messages": [USER_HI, {"role": "assistant"}], "continue_final_message": True},
        "continue-an-empty-message",
        "messages[1].content",
        "needs a final message with text",
    ),
    bad(M, "tool_choice", "required", "needs tools"),
    bad(M, "tool_choice", {"type": "function"}, "needs tools"),
    bad(M, "tools", "x", "valid list"),
    bad(M, "metadata", {"a": 5}, "valid string", param="metadata.a"),
    bad(M, "metadata", {"str": 5}, "valid string", param="metadata.str"),  # a key, not a type
    # OpenAI's bounds (kept with a stored answer: was up to the body's size)
    bad(M, "metadata", {str(i): "v" for i in range(17)}, "at most 16 key-value pairs"),
    bad(M, "metadata", {"k" * 65: "v"}, "at most 64 characters"),
    bad(M, "metadata", {"k": "v" * 513}, "the value of 'k': expected at most 512 characters"),
    raw(
        RESPONSES,
        {**R, "metadata": {"k": "v" * 8192}},
        "responses-metadata-long",
        "metadata",
        "at most 512 characters",
    ),
    # ---------------------------------------------------------------- whole bodies
    raw(COMPLETIONS, b"[1, 2]", "body-list", "body", "valid dictionary", "got [1, 2]"),
    raw(CHAT, b"5", "body-number", "body", "valid dictionary"),
    raw(COMPLETIONS, b"null", "body-null", "body", "valid dictionary"),
    raw(COMPLETIONS, b"", "body-empty", "body", "Field required"),
    raw(COMPLETIONS, b'{"model": "pirate"', "body-cut", "body", "not valid JSON"),
    raw(COMPLETIONS, b'{"model": "pirate"} x', "body-trailing", "body", "not valid JSON"),
    # was "There was an error parsing the body", param null
    raw(COMPLETIONS, b'{"prompt": "\xff"}', "body-not-utf8", "body", "UnicodeDecodeError"),
    raw(COMPLETIONS, b"[" * 10**5 + b"]" * 10**5, "body-nested", "body", "RecursionError"),
    # was read in full (50 MB: tokenized for ~100 s)
    raw(COMPLETIONS, b" " * (MAX_BODY + 1), "body-too-large", "body", "at most", status=413),
    # ---------------------------------------------------------------- runtime adapters
    raw(RESPONSES, {"model": "pirate"}, "resp-no-input", "input", "Field required"),
    raw(RESPONSES, {**R, "input": 5}, "resp-input-int", "input", "a string or a list"),
    raw(RESPONSES, {**R, "input": []}, "resp-input-empty", "input", "at least one item"),
    raw(
        RESPONSES,
        {**R, "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
        "resp-file-part",
        "input[0].content[0].type",
        "only text",
    ),
    raw(RESPONSES, {**R, "max_output_tokens": 0}, "resp-max-0", "max_output_tokens", ">= 1"),
    raw(RESPONSES, {**R, "temperature": "hot"}, "resp-temp-str", "temperature", "valid number"),
    raw(RESPONSES, {**R, "truncation": "some"}, "resp-truncation", "truncation", "'auto'"),
    raw(RESPONSES, {**R, "store": "yes"}, "resp-store-str", "store", "valid boolean"),
    raw(RESPONSES, {**R, "stream_options": {}}, "resp-unknown", "stream_options", "unknown field"),
    raw(
        RESPONSES,
        {**R, "previous_response_id": "resp_0"},
        "resp-no-previous",
        "previous_response_id",
        "no stored response",
        status=404,
    ),
    raw(LOAD, {}, "load-empty", "lora_name", "Field required"),
    raw(LOAD, {"lora_path": "pirate_copy"}, "load-no-name", "lora_name", "Field required"),
    raw(
        LOAD, {"lora_name": "x"}, "load-no-path", "lora_path", "exactly one of lora_path and merge"
    ),
    raw(LOAD, {"lora_name": "x", "merge": {"a": 1}}, "load-merge-dict", "merge", "valid list"),
    raw(
        LOAD,
        {"lora_name": "x", "merge": [{"lora_name": "pirate"}]},
        "load-merge-no-weight",
        "merge[0].weight",
        "Field required",
    ),
    raw(LOAD, {"lora_name": 5, "lora_path": "p"}, "load-name-int", "lora_name", "valid string"),
    raw(LOAD, {"lora_name": "x", "lora_path": 5}, "load-path-int", "lora_path", "valid string"),
    # param was null, and the message did not say lora_name
    raw(
        LOAD,
        {"lora_name": "", "lora_path": "pirate_copy"},
        "load-name-empty",
        "lora_name",
        "lora_name",
        "non-empty",
    ),
    raw(
        LOAD,
        {"lora_name": " x", "lora_path": "pirate_copy"},
        "load-name-space",
        "lora_name",
        "whitespace",
    ),
    raw(
        LOAD,
        {"lora_name": "x" * 300, "lora_path": "pirate_copy"},
        "load-name-long",
        "lora_name",
        "256",
    ),
    raw(LOAD, {"lora_name": "x", "lora_path": ""}, "load-path-empty", "lora_path", "directory"),
    raw(LOAD, {"lora_name": "x", "lora_path": "a\x00b"}, "load-path-nul", "lora_path", "directory"),
    # was 500
    raw(
        LOAD,
        {"lora_name": "x", "lora_path": "\ud800"},
        "load-path-surrogate",
        "lora_path",
        "surrogate",
    ),
    # was taken for true
    raw(
        LOAD,
        {"lora_name": "x", "lora_path": "pirate_copy", "load_inplace": 1},
        "load-inplace-int",
        "load_inplace",
        "valid boolean",
    ),
    raw(
        LOAD,
        {"lora_name": "x", "lora_path": "pirate_copy", "extra": 1},
        "load-unknown-field",
        "extra",
        "unknown field",
    ),
    raw(LOAD, b"[1]", "load-body-list", "body", "valid dictionary"),
    raw(UNLOAD, {}, "unload-empty", "lora_name", "Field required"),
    raw(UNLOAD, {"lora_name": None}, "unload-name-null", "lora_name", "valid string"),
    raw(UNLOAD, {"lora_name": "x", "lora_int_id": "1"}, "unload-id-str", "lora_int_id", "integer"),
    # was 500
    raw(UNLOAD, {"lora_name": "\udfff"}, "unload-name-surrogate", "lora_name", "surrogate"),
    raw(UNLOAD, {"lora_name": "nobody"}, "unload-unknown", "lora_name", "not loaded", status=404),
    bad(M, "reasoning_effort", "ultra", "'minimal', 'low', 'medium' or 'high'"),
    bad(M, "reasoning_effort", 5, "'minimal', 'low', 'medium' or 'high'"),
    bad(C, "service_tier", "flex", "'auto' or 'default'"),
    bad(C, "safety_identifier", 5, "valid string"),
    raw(INVOKE, b"{oops", "invoke-bad-json", "body", "not valid JSON"),
    raw(INVOKE, b'{"prompt": "\xff"}', "invoke-not-utf8", "body", "not valid JSON"),
    raw(INVOKE, b"[1]", "invoke-list", "body", "expected a chat (with messages)"),
    raw(INVOKE, b'"Hi"', "invoke-string", "body", "a completion (with prompt)"),
    raw(INVOKE, {"model": "pirate"}, "invoke-no-kind", "body", "a response (with input)"),
    raw(INVOKE, {**C, "prompt": 5}, "invoke-prompt-int", "prompt", PROMPT_TYPES),
    raw(INVOKE, {**M, "temperature": NAN}, "invoke-chat-nan", "temperature", "finite number"),
    raw(INVOKE, {**M, "messages": "Hi"}, "invoke-messages-str", "messages", "valid list"),
    raw(INVOKE, {**R, "input": 5}, "invoke-input-int", "input"),
    raw(INVOKE, {**C, "model": "nobody"}, "invoke-unknown-model", "model", status=404),
    raw(
        INVOKE,
        {**M, "messages": [{"role": "user", "content": "\ud800"}]},
        "invoke-surrogate",
        "messages",
        "messages[0].content: expected valid Unicode",
    ),
]


@pytest.mark.parametrize("path, body, status, param, needles", CASES)
def test_malformed_request_gets_a_4xx_naming_the_field(http, path, body, status, param, needles):
    check_error(post(http, path, body), status, param, *needles)


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(http):
    def chunks():  # no Content-Length: sent with Transfer-Encoding: chunked
        yield b'{"model": "pirate", "prompt": "'
        for _ in range(2 * MAX_BODY // 65536):
            yield b"x" * 65536
        yield b'"}'

    response = http.post(
        COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"}
    )
    check_error(response, 413, "body", "at most 1048576 bytes")


def test_top_k_past_the_vocabulary_keeps_every_token(http):
    """Was a 500: top_k over int32 broke the engine step, which failed every running request."""
    greedy = post(http, COMPLETIONS, comp(top_k=2**40, max_tokens=40))
    assert greedy.status_code == 200, greedy.text
    assert greedy.json()["choices"][0]["text"] == PIRATE
    sampled = comp(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    texts = []
    for top_k in (2**40, 0):
        response = post(http, COMPLETIONS, {**sampled, "top_k": top_k})
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1]


def test_a_null_is_the_fields_default(http):
    """OpenAI's schema marks the optional fields nullable and clients send null for unset:
    n, stream, echo, the chat's logprobs, the Responses API's stream and store, LoRAX's stream
    and its parameters' flags given null answer as if left out (they were 400s)."""
    nulls = {"n": None, "stream": None, "priority": None, "skip_special_tokens": None}
    cases = [
        (COMPLETIONS, comp(**nulls, echo=None, stream_options=None), C),
        (CHAT, chat(**nulls, logprobs=None, temperature=0), chat(temperature=0)),
        (RESPONSES, {**R, "stream": None, "store": None}, R),
        (
            "/generate",
            {"inputs": "Hi", "stream": None, "parameters": {"max_new_tokens": 4, "details": None}},
            {"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
        ),
    ]
    for path, with_nulls, without in cases:
        answers = [post(http, path, body) for body in (with_nulls, without)]
        for response in answers:
            assert response.status_code == 200, (path, response.text)
        first, second = (response.json() for response in answers)
        for key in ("id", "created", "created_at"):
            first.pop(key, None), second.pop(key, None)
        if path == RESPONSES:
            for item in first["output"] + second["output"]:
                item.pop("id", None)
            first, second = first["output"], second["output"]
        assert first == second, path


def test_vllm_s_neutral_values_are_taken(http):
    """What vLLM takes as "off": top_k -1, seed -1 (no seed: sampled answers differ from run
    to run), a chat's top_logprobs 0 without logprobs; and logit_bias past [-100, 100] is
    clamped (all were 400s, and seed -1 a fixed seed)."""
    from jaxlora.server.app import _samplings
    from jaxlora.server.protocol import CompletionRequest

    for body in (comp(top_k=-1), chat(top_logprobs=0), comp(logit_bias={"5": 150})):
        path = CHAT if "messages" in body else COMPLETIONS
        response = post(http, path, body)
        assert response.status_code == 200, (body, response.text)
    request = CompletionRequest(**comp(seed=-1, n=2, temperature=1.0))
    assert [p.seed for p in _samplings(request, 4, None, 2, 4)] == [None, None]
    request = CompletionRequest(**comp(seed=7, n=2, temperature=1.0))
    assert [p.seed for p in _samplings(request, 4, None, 2, 4)] == [7, 8]
    assert post(http, CHAT, chat(top_logprobs=2)).status_code == 400


def test_tokenizing_leaves_the_event_loop_free(served, monkeypatch):
    """A slow tokenization (a long prompt, a large vocabulary) runs off the event loop, which
    serves every client: /health answers while it runs."""
    server, state = served
    real_encode = state.tokenizer.encode
    started = threading.Event()

    def slow_encode(text, *args, **kwargs):
        started.set()
        time.sleep(2.0)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(state.tokenizer, "encode", slow_encode)
    answers = []
    worker = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{server.url}{COMPLETIONS}",
                json=comp(max_tokens=40),
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            )
        )
    )
    worker.start()
    assert started.wait(30)
    begin = time.monotonic()
    health = httpx.get(f"{server.url}/health", timeout=30)
    waited = time.monotonic() - begin
    worker.join(60)
    assert health.status_code == 200 and waited < 1.0, waited
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["choices"][0]["text"] == PIRATE


def test_the_server_is_unharmed(served, http):
    """Runs last: no request of this module got a 5xx (or a 401, 405, ...), no bad load
    registered an adapter, and greedy requests still give the adapter's answer."""
    server, state = served
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert models == {demo.DEMO_MODEL_NAME, *demo.DEMO_SIGNATURES}
    answer = post(http, COMPLETIONS, comp(max_tokens=40))
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == PIRATE
    answer = post(http, CHAT, chat(max_tokens=40, temperature=0))
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == PIRATE.lstrip()
    assert wait_until(lambda: engine_idle(state))
    samples = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    statuses = collections.Counter()
    for (name, labels), value in samples.items():
        if name == "jaxlora_http_responses_total":
            statuses[dict(labels)["status"]] += value
    assert {s for s in statuses if s[0] in "45"} <= {"400", "404", "413"}, statuses

"""Tool calls: the two formats read back from chat answers, whole and streamed; forced calls;
the chat template given the tools and the tool-calling turns; the chat message the server
builds."""

from __future__ import annotations

import json

import pytest

from jaxlora.errors import ConfigError, RequestError
from jaxlora.server.app import chat_message
from jaxlora.server.config import ServerConfig
from jaxlora.server.tool_calls import ForcedToolCalls, ToolCall, ToolCallStream, parse_tool_calls
from jaxlora.tokenizer import Tokenizer, tiny_tokenizer

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
HERMES = (
    f'Let me look. <tool_call>\n{WEATHER}\n</tool_call><tool_call>{{"name": "now"}}</tool_call>'
)


def test_hermes_blocks_become_calls_after_the_text():
    content, calls = parse_tool_calls(HERMES, "hermes")
    assert content == "Let me look. "  # (as it streams, and as vLLM answers: not stripped)
    assert calls == [
        ToolCall("get_weather", json.dumps({"city": "Paris", "unit": "C"})),
        ToolCall("now", "{}"),
    ]
    assert parse_tool_calls(f"<tool_call>{WEATHER}</tool_call>", "hermes")[0] is None
    # Arguments given as JSON text are read too.
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_tool_calls(text, "hermes")[1] == [ToolCall("f", '{"x": 1}')]


@pytest.mark.parametrize(
    "text",
    [
        "no call at all",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        "<tool_call>{}",  # never closed
    ],
)
def test_what_does_not_parse_stays_text(text):
    assert parse_tool_calls(text, "hermes") == (text, [])


def test_llama3_json_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_tool_calls(one, "llama3_json") == (
        None,
        [ToolCall("get_weather", '{"city": "Paris"}')],
    )
    two = f'<|python_tag|>{one}; {{"name": "now", "parameters": {{}}}}'
    assert [c.name for c in parse_tool_calls(two, "llama3_json")[1]] == ["get_weather", "now"]
    for text in ("The weather is fine.", '{"name": "f"} and more', '{"city": "Paris"}'):
        assert parse_tool_calls(text, "llama3_json") == (text, [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_text_stops_before_a_call_and_the_call_comes_at_the_end(piece):
    stream = ToolCallStream("hermes")
    streamed = "".join(stream.push(HERMES[i : i + piece]) for i in range(0, len(HERMES), piece))
    assert streamed == "Let me look. "
    held, calls = stream.finish()
    assert held == "" and [c.name for c in calls] == ["get_weather", "now"]
    # A "<" that is no call is handed out once it is clear.
    plain = ToolCallStream("hermes")
    out = "".join(plain.push(c) for c in "a < b <tool")
    assert out == "a < b " and plain.finish() == ("<tool", [])


def test_streamed_llama3_answers_are_held_only_when_they_open_like_a_call():
    stream = ToolCallStream("llama3_json")
    assert stream.push("  ") == "" and stream.push("Hello {x}") == "  Hello {x}"
    assert stream.push(" more") == " more" and stream.finish() == ("", [])
    call = '{"name": "f", "parameters": {"a": 1}}'
    stream = ToolCallStream("llama3_json")
    assert "".join(stream.push(c) for c in call) == ""
    assert stream.finish() == ("", [ToolCall("f", '{"a": 1}')])
    broken = ToolCallStream("llama3_json")
    assert broken.push("{not a call") == "" and broken.finish() == ("{not a call", [])


def test_answers_past_pythons_readers_or_cut_short_stay_text():
    """A model repeating a digit until max_tokens (past Python's 4,300 digits a number), or
    nesting past the recursion limit, is no call and no crash: the text stays, whole and
    streamed. Plain JSON with a "name" is no llama3_json call without its parameters. A
    hermes block left open is read as vLLM reads it: a whole call (the closing tag never
    came), or, cut short, the answer as text (its last call was dropped)."""
    digits = "1" * 5000
    answers = {
        "hermes": f'<tool_call>{{"name": "f", "arguments": {{"x": {digits}}}}}</tool_call>',
        "llama3_json": f'{{"name": "f", "parameters": {{"x": {digits}',
        "mistral": f'[TOOL_CALLS] [{{"name": "f", "arguments": {{"x": {digits}}}}}]',
        "pythonic": "[" * 3000,
    }
    for parser, answer in answers.items():
        assert parse_tool_calls(answer, parser) == (answer, []), parser
        stream = ToolCallStream(parser)
        streamed = stream.push(answer)
        assert streamed + stream.finish()[0] == answer and stream.finish()[1] == []
    assert parse_tool_calls("[" * 3000, "llama3_json") == ("[" * 3000, [])
    data = '{"name": "Alice", "age": 30}'
    assert parse_tool_calls(data, "llama3_json") == (data, [])
    left_open = f"Hi <tool_call>{WEATHER}"
    assert parse_tool_calls(left_open, "hermes") == (
        "Hi ",
        [ToolCall("get_weather", json.dumps({"city": "Paris", "unit": "C"}))],
    )
    cut = f'<tool_call>{WEATHER}</tool_call>\n<tool_call>\n{{"name": "b", "argu'
    assert parse_tool_calls(cut, "hermes") == (cut, [])
    forced = ForcedToolCalls([_tool("f")], "required")
    assert forced.parse(f'[{{"name": "f", "parameters": {{"x": {digits}}}}}]') == []
    # A lone surrogate (half an emoji's escape) stays escaped: the answer must encode as UTF-8.
    [call] = parse_tool_calls(
        '<tool_call>{"name": "f", "arguments": {"s": "\\ud83d é"}}</tool_call>', "hermes"
    )[1]
    assert call.arguments == '{"s": "\\ud83d \\u00e9"}'
    call.arguments.encode()


def test_mistral_calls_in_both_formats():
    listed = f'Checking. [TOOL_CALLS] [{WEATHER}, {{"name": "now", "arguments": {{}}}}]'
    content, calls = parse_tool_calls(listed, "mistral")
    assert content == "Checking. "
    assert calls == [
        ToolCall("get_weather", json.dumps({"city": "Paris", "unit": "C"})),
        ToolCall("now", "{}"),
    ]
    named = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]now[ARGS]{}'
    assert parse_tool_calls(named, "mistral") == (
        None,
        [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("now", "{}")],
    )
    for text in (
        "no call",
        "[TOOL_CALLS] [not json]",
        "[TOOL_CALLS] []",
        '[TOOL_CALLS] [{"arguments": {}}]',
        "[TOOL_CALLS]get_weather{}",
        "[TOOL_CALLS]get_weather[ARGS]{broken",
    ):
        assert parse_tool_calls(text, "mistral") == (text, []), text


def test_pythonic_calls():
    text = '[get_weather(city="Paris", days=[1, 2], metric=True), tools.now(), f(x=None)]'
    assert parse_tool_calls(text, "pythonic") == (
        None,
        [
            ToolCall("get_weather", '{"city": "Paris", "days": [1, 2], "metric": true}'),
            ToolCall("tools.now", "{}"),
            ToolCall("f", '{"x": null}'),
        ],
    )
    wrapped = '<|python_start|>[now(zone="UTC")]<|python_end|>'
    assert parse_tool_calls(wrapped, "pythonic")[1] == [ToolCall("now", '{"zone": "UTC"}')]
    for text in (
        "[1] First point.",
        "[]",
        "[f(1)]",  # positional
        "[f(x=y)]",  # not a literal
        "[f(**kw)]",
        "Sure: [f()]",
        "[f(x=1)",
    ):
        assert parse_tool_calls(text, "pythonic") == (text, []), text


@pytest.mark.parametrize(
    "parser, answer, streamed, calls",
    [
        ("mistral", f"Checking. [TOOL_CALLS] [{WEATHER}]", "Checking. ", ["get_weather"]),
        ("mistral", "A [TOOL plain answer", "A [TOOL plain answer", []),
        ("pythonic", '[now(zone="UTC"), now()]', "", ["now", "now"]),
        ("pythonic", "Plain [1] answer", "Plain [1] answer", []),
    ],
)
@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_new_parsers_stream_as_the_whole_answer_parses(parser, answer, streamed, calls, piece):
    stream = ToolCallStream(parser)
    out = "".join(stream.push(answer[i : i + piece]) for i in range(0, len(answer), piece))
    held, found = stream.finish()
    assert out + held == (streamed if calls else answer)
    assert [c.name for c in found] == calls
    assert parse_tool_calls(answer, parser)[1] == found


def test_chat_message_carries_the_calls_and_their_finish_reason():
    message, finish = chat_message(HERMES, "stop", "hermes")
    assert finish == "tool_calls" and message["content"] == "Let me look. "
    [first, second] = message["tool_calls"]
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert json.loads(first["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert second["function"] == {"name": "now", "arguments": "{}"} and first["id"] != second["id"]
    assert chat_message(HERMES, "stop", None) == ({"role": "assistant", "content": HERMES}, "stop")
    assert chat_message("plain", "length", "hermes")[1] == "length"
    with pytest.raises(ConfigError, match="tool_call_parser.*'hermes', 'llama3_json'"):
        ServerConfig(model_name="m", tool_call_parser="xml")


TEMPLATE = (
    "{% if tools %}[TOOLS] {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n"
    "{% endif %}{% for m in messages %}[{{ m['role'] }}] "
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<call {{ c['function']['name'] }}"
    " {{ c['function']['arguments']['city'] }}>{% endfor %}"
    "{% elif m['role'] == 'tool' %}({{ m['tool_call_id'] }}) {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_chat_template_renders_tools_and_the_tool_calling_turns():
    pytest.importorskip("jinja2")
    base = tiny_tokenizer()
    tok = Tokenizer(base.backend, bos_token="<bos>", eos_tokens=("<eos>",), chat_template=TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    # (HF's renderer trims the newline after a block tag)
    assert tok.apply_chat_template(messages, tools=tools) == (
        "[TOOLS] get_weather [user] Weather?[assistant] <call get_weather Paris>"
        "[tool] (call_1) 21 C[assistant] "
    )
    assert not tok.apply_chat_template(messages[:1]).startswith("[TOOLS]")
    with pytest.raises(RequestError, match="default chat template cannot render tools"):
        base.apply_chat_template(messages[:1], tools=tools)


def _tool(name, parameters=None):
    function = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def test_forced_calls_schemas_parsing_and_stream():
    """ForcedToolCalls: a named function's answer is its arguments (its parameters' schema; an
    empty object's without one), streamed as they come; "required" is a non-empty array of
    {name, parameters} of the offered tools, parsed whole at the end, whose answer cut short
    stays text (a named call's cut short is the call with the arguments so far, as streamed);
    an unknown function or a malformed tool_choice is refused."""
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [_tool("weather", city), _tool("ping")]
    named = ForcedToolCalls(tools, {"type": "function", "function": {"name": "weather"}})
    assert named.schema == city and named.finish_reason == "stop"
    assert named.push('{"city":') == "" and named.push(' "Oslo"}') == ""
    first, second = named.call_deltas()
    assert first["id"].startswith("call_") and first["function"] == {
        "name": "weather",
        "arguments": '{"city":',
    }
    assert second == {"index": 0, "function": {"arguments": ' "Oslo"}'}}
    assert named.call_deltas() == [] and named.finish() == ("", [])
    assert named.parse('{"city": "Oslo"}') == [ToolCall("weather", '{"city": "Oslo"}')]
    assert named.parse('{"city": "Os') == [ToolCall("weather", '{"city": "Os')]
    ping = ForcedToolCalls(tools, {"type": "function", "function": {"name": "ping"}})
    assert ping.schema == {"type": "object", "properties": {}}

    required = ForcedToolCalls(tools, "required")
    assert required.finish_reason == "tool_calls" and required.schema["minItems"] == 1
    names = [c["properties"]["name"]["const"] for c in required.schema["items"]["anyOf"]]
    assert names == ["weather", "ping"]
    answer = (
        '[{"name": "ping", "parameters": {}}, {"name": "weather", "parameters": {"city": "x"}}]'
    )
    required.push(answer[:10])
    required.push(answer[10:])
    assert required.call_deltas() == []
    assert required.finish() == (
        "",
        [ToolCall("ping", "{}"), ToolCall("weather", '{"city": "x"}')],
    )
    required.push(answer[:30])
    assert required.finish() == (answer[:30], [])

    with pytest.raises(ValueError, match="'clock' is not among the tools"):
        ForcedToolCalls(tools, {"type": "function", "function": {"name": "clock"}})
    with pytest.raises(ValueError, match="expected 'auto', 'none', 'required' or"):
        ForcedToolCalls(tools, {"type": "function"})

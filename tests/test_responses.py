"""The Responses API's mapping onto chats (jaxlora.server.responses): input items to messages,
output items from an answer, the streamed events against OpenAI's own types, the store."""

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from jaxlora.errors import RequestError
from jaxlora.server import responses
from jaxlora.server.protocol import ResponsesRequest


def body(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Hi", **fields})


def test_input_items_become_chat_messages():
    assert responses.input_messages("Hi") == [{"role": "user", "content": "Hi"}]
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Time"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "c1", "name": "clock", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "zone", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "12:00"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "UTC"}],
        },
        {"type": "function_call", "call_id": "c3", "name": "clock", "arguments": "{}"},
    ]
    call = lambda i, n, a: {"id": i, "type": "function", "function": {"name": n, "arguments": a}}  # noqa: E731
    assert responses.input_messages(items) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time"},
        {
            "role": "assistant",
            "content": "Let me see.",
            "tool_calls": [call("c1", "clock", "{}"), call("c2", "zone", '{"a": 1}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "UTC"},
        {"role": "assistant", "content": None, "tool_calls": [call("c3", "clock", "{}")]},
    ]


@pytest.mark.parametrize(
    "items, param",
    [
        ([], "input"),
        (["Hi"], "input[0]"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}],
            "input[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_text", "text": 5}]}],
            "input[0].content[0].text",
        ),
        ([{"role": "user", "content": 5}], "input[0].content"),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
        ([{"type": "function_call_output", "call_id": "c", "output": 3}], "input[0].output"),
        ([{"type": "item_reference", "id": "x"}], "input[0].type"),
    ],
)
def test_bad_input_items_name_the_field(items, param):
    with pytest.raises(RequestError) as raised:
        responses.input_messages(items)
    assert raised.value.param == param and str(raised.value).startswith(param)


def test_a_response_becomes_a_chat():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat, conversation = responses.chat_body(
        body(
            instructions="Be brief.",
            max_output_tokens=7,
            temperature=0.0,
            tools=[{"type": "function", "name": "clock", "parameters": {"type": "object"}}],
            tool_choice={"type": "function", "name": "clock"},
            text={"format": {"type": "json_schema", "name": "a", "schema": schema}},
            truncation="auto",
            reasoning={"effort": "low"},
        ),
        history=[{"role": "user", "content": "Before"}],
    )
    assert [m.role for m in chat.messages] == ["system", "user", "user"]
    assert conversation == [
        {"role": "user", "content": "Before"},
        {"role": "user", "content": "Hi"},
    ]
    assert chat.max_tokens == 7 and chat.temperature == 0.0 and chat.n == 1
    assert chat.tools == [
        {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "clock"}}
    assert chat.response_format.json_schema == {"name": "a", "schema": schema}
    assert chat.truncate_prompt_tokens == -1
    assert chat.reasoning_effort == "low" and chat.chat_template_kwargs is None
    assert not chat.logprobs and chat.top_logprobs is None
    # Logprobs: asked for by include, or by top_logprobs (alternatives imply them).
    for fields, top in (
        ({"include": ["message.output_text.logprobs"]}, 0),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 3}, 3),
        ({"top_logprobs": 2}, 2),
    ):
        chat, _ = responses.chat_body(body(**fields), [])
        assert chat.logprobs and chat.top_logprobs == top, fields
    chat, _ = responses.chat_body(body(top_logprobs=0), [])
    assert not chat.logprobs


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"background": True}, "background"),
        (
            {"include": ["message.output_text.logprobs", "reasoning.encrypted_content"]},
            "include[1]",
        ),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"reasoning": {"budget": 3}}, "reasoning.budget"),
        ({"reasoning": {"effort": "ultra"}}, "reasoning.effort"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tool_choice": {"type": "mcp"}}, "tool_choice"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"format": "json"}}, "text.format"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"temperature": -1.0}, None),  # (the engine's check, at submit)
        ({"max_output_tokens": "5"}, "max_output_tokens"),
    ],
)
def test_unsupported_or_bad_fields_name_the_field(fields, param):
    if param == "max_output_tokens":  # (pydantic's own refusal, strict types)
        with pytest.raises(Exception, match="max_output_tokens"):
            body(**fields)
        return
    if param is None:
        responses.chat_body(body(**fields), [])
        return
    with pytest.raises(RequestError) as raised:
        responses.chat_body(body(**fields), [])
    assert raised.value.param == param, raised.value


def test_chat_errors_are_renamed_to_the_response_fields():
    from jaxlora.server.errors import with_param

    renamed = responses.renamed(
        with_param(RequestError("max_tokens: 99 plus the prompt's 3 tokens ..."), "max_tokens")
    )
    assert renamed.param == "max_output_tokens"
    assert str(renamed) == "max_output_tokens: 99 plus the prompt's 3 tokens ..."
    renamed = responses.renamed(with_param(RequestError("messages[2].content: x"), "messages[2]"))
    assert renamed.param == "input" and str(renamed) == "input: x"
    engine = responses.renamed(RequestError("max_tokens: too many"))  # (no param: the message's)
    assert engine.param == "max_output_tokens" and str(engine) == "max_output_tokens: too many"
    kept = with_param(RequestError("tools: x"), "tools")
    assert responses.renamed(kept) is kept


def test_output_items_validate_as_openai_types():
    message = {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "Think",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    output = responses.output_items(message, "tool_calls")
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call"]
    request = body(tools=[{"type": "function", "name": "f", "parameters": {}, "strict": False}])
    response = responses.response_object(
        request, "resp_1", 1, "completed", output, responses.usage(3, 4)
    )
    parsed = Response.model_validate(response)
    assert parsed.output_text == "Hello" and parsed.usage.total_tokens == 7
    assert responses.assistant_message(output) == {
        "role": "assistant",
        "content": "Hello",
        "tool_calls": message["tool_calls"],
    }
    cut = responses.output_items({"role": "assistant", "content": ""}, "length")
    assert cut[0]["status"] == "incomplete" and cut[0]["content"][0]["text"] == ""
    incomplete = responses.response_object(body(), "r", 1, "incomplete", cut, None)
    assert Response.model_validate(incomplete).incomplete_details.reason == "max_output_tokens"


def _events(sse: list[str]) -> list[dict]:
    out = []
    for text in sse:
        kind, data = text.strip().split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        out.append(payload)
    return out


def test_streamed_events_validate_and_add_up_to_the_response():
    writer = responses.ResponseEvents(body(), "resp_1", 1)
    sse = writer.start()
    sse += writer.reasoning("Thi") + writer.reasoning("nk")
    sse += writer.content("Hel") + writer.content("lo")
    sse += writer.call_deltas(
        [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    )
    sse += writer.call_deltas([{"index": 0, "function": {"arguments": '{"a"'}}])
    sse += writer.call_deltas([{"index": 0, "function": {"arguments": ": 1}"}}])
    closing, response = writer.finish("stop", responses.usage(2, 5))
    events = _events(sse + closing)
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert (
        kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    )
    parsed = Response.model_validate(response)
    assert parsed.output_text == "Hello"
    assert parsed.output[0].content[0].text == "Think"
    assert parsed.output[2].arguments == '{"a": 1}' and parsed.output[2].call_id == "call_1"
    assert all(item.status == "completed" for item in parsed.output)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Hello"
    # An empty answer is an empty message, as whole; one cut short is incomplete.
    writer = responses.ResponseEvents(body(), "resp_2", 1)
    closing, response = writer.finish("length", responses.usage(2, 0))
    for event in _events(closing):
        adapter.validate_python(event)
    assert _events(closing)[-1]["type"] == "response.incomplete"
    assert Response.model_validate(response).output[0].status == "incomplete"
    # An error after the stream started: an error event (the server's error body's fields).
    payload = {"error": {"message": "generation failed", "type": "server_error", "code": "500"}}
    [error] = _events(responses.ResponseEvents(body(), "resp_3", 1).error(payload))
    adapter.validate_python(error)
    assert (error["type"], error["message"], error["code"]) == ("error", "generation failed", "500")


def _lp(token: str) -> dict:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


def test_streamed_logprobs_of_tokens_without_text_open_no_message():
    """With logprobs the chat streams pieces of no text for tokens a parser holds back: a
    reasoning block's tags, or text held before any item. They open no message item (the
    streamed output once began with an empty message, its logprobs the opening tag's, before
    the reasoning): a tag's logprobs are the reasoning's and dropped, as the whole answer's
    message leaves them out; text held before any item takes its logprobs to the message."""
    writer = responses.ResponseEvents(body(top_logprobs=1), "resp_1", 1)
    sse = writer.start()
    sse += writer.content("", [_lp("<th"), _lp("ink>")])  # (the opening tag, held)
    sse += writer.reasoning("Hm")
    sse += writer.content("", [_lp("</think>")])  # (the closing tag)
    sse += writer.content("Hi", [_lp("Hi")])
    sse += writer.content("", [_lp("<eos>")])
    closing, response = writer.finish("stop", responses.usage(2, 6))
    events = _events(sse + closing)
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message"]
    parsed = Response.model_validate(response)
    assert [item.type for item in parsed.output] == ["reasoning", "message"]
    tokens = [entry.token for entry in parsed.output[1].content[0].logprobs]
    assert tokens == ["Hi", "<eos>"]
    deltas = [x["token"] for e in events for x in e.get("logprobs", []) if "delta" in e]
    assert deltas == tokens
    # Held before any item, with no reasoning after: the message's first tokens.
    writer = responses.ResponseEvents(body(top_logprobs=1), "resp_2", 1)
    sse = writer.content("", [_lp("<to")]) + writer.content("<tool", [_lp("ol")])
    closing, response = writer.finish("stop", responses.usage(2, 2))
    [message] = Response.model_validate(response).output
    assert [e.token for e in message.content[0].logprobs] == ["<to", "ol"]
    streamed = [x["token"] for e in _events(sse) for x in e.get("logprobs", [])]
    assert streamed == ["<to", "ol"]
    # An answer of such tokens only: the empty message has them (as the whole answer's has).
    writer = responses.ResponseEvents(body(top_logprobs=1), "resp_3", 1)
    sse = writer.content("", [_lp("<eos>")])
    closing, response = writer.finish("stop", responses.usage(2, 1))
    [message] = Response.model_validate(response).output
    assert message.content[0].text == "" and message.content[0].logprobs[0].token == "<eos>"
    assert [e["type"] for e in _events(sse + closing)][:3] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]


def test_the_store_keeps_the_most_recent():
    store = responses.ResponseStore(2)
    for i in range(3):
        store.put(responses.StoredResponse({"id": f"r{i}"}, [i], []))
    assert store.get("r0") is None and store.get("r2").conversation == [2]
    assert store.delete("r1") and not store.delete("r1")


def test_one_keys_responses_do_not_push_out_anothers():
    """Past its capacity the store drops the oldest response of the key holding the most: a
    flood from one key replaces its own responses, and another key's stay (a global LRU let
    any tenant's traffic make another's GET and previous_response_id 404)."""
    store = responses.ResponseStore(4)
    store.put(responses.StoredResponse({"id": "acme-0"}, [], [], owner="acme"))
    store.put(responses.StoredResponse({"id": "acme-1"}, [], [], owner="acme"))
    for i in range(10):
        store.put(responses.StoredResponse({"id": f"globex-{i}"}, [], [], owner="globex"))
    assert store.get("acme-0") and store.get("acme-1")
    assert [i for i in range(10) if store.get(f"globex-{i}")] == [8, 9]
    # Now the one holding the most, acme's oldest go.
    store.put(responses.StoredResponse({"id": "acme-2"}, [], [], owner="acme"))
    assert store.get("acme-0") is None and store.get("globex-8") and store.get("globex-9")
    assert store.delete("acme-2") and not store.delete("acme-2")
    store.put(responses.StoredResponse({"id": "acme-1"}, ["again"], [], owner="acme"))
    assert store.get("acme-1").conversation == ["again"] and len(store._items) == 3


def test_input_items_are_listed_as_openai_items():
    from openai.types.responses import ResponseItemList

    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"type": "message", "role": "assistant", "content": "Again.", "id": "msg_given"},
        {"type": "function_call", "call_id": "c1", "name": "clock", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "12:00", "id": "fco_1"},
    ]
    listed = responses.input_items(items)
    page = {
        "object": "list",
        "data": listed,
        "first_id": listed[0]["id"],
        "last_id": listed[-1]["id"],
        "has_more": False,
    }
    parsed = ResponseItemList.model_validate(page)
    assert [item.type for item in parsed.data] == ["message"] * 4 + [
        "function_call",
        "function_call_output",
    ]
    assert parsed.data[2].content[0].text == "Hello." and parsed.data[5].id == "fco_1"
    # (ids sent with the items are kept, an assistant message's too)
    assert parsed.data[3].id == "msg_given" and parsed.data[3].content[0].text == "Again."
    assert len({item["id"] for item in listed}) == 6
    [one] = responses.input_items("Hi")
    assert one["role"] == "user" and one["content"] == [{"type": "input_text", "text": "Hi"}]

"""OpenAI's Responses API (``POST /v1/responses``) over the chat machinery.

A response is a chat: ``instructions`` become a system message, ``input`` the messages after
it (a string is one user message; items are messages with text content, ``function_call``
items an assistant's tool calls, ``function_call_output`` items the tool results), tools
become chat tools and ``text.format`` the chat's ``response_format``. The answer's parts
become output items: the reasoning (with ``--reasoning_parser``) a ``reasoning`` item, the
text a ``message`` item, each tool call a ``function_call`` item. A response cut by
``max_output_tokens`` is ``incomplete``.

Responses are kept (``store``, the default) in memory, the most recent
``ServerConfig.max_stored_responses``: ``GET /v1/responses/{id}`` returns one, ``DELETE``
forgets it, and ``previous_response_id`` continues its conversation (its input and output,
not its instructions, as OpenAI's).

Streamed, the events are OpenAI's: ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added``, its deltas (``response.reasoning_text.delta``,
``response.content_part.added`` and ``response.output_text.delta``,
``response.function_call_arguments.delta``), their ``.done`` events and
``response.output_item.done``, and last ``response.completed`` (or ``response.incomplete``)
with the whole response; an error after the stream started is an ``error`` event.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import uuid
from typing import Any

from pydantic import ValidationError

from jaxlora.errors import JaxloraError, RequestError
from jaxlora.server.errors import renamed_param, with_param
from jaxlora.server.protocol import SERVICE_TIERS, ChatCompletionRequest, ResponsesRequest

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# Chat fields an error may name, and the Responses field each comes from.
_FIELDS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "truncate_prompt_tokens": "truncation",
    "chat_template_kwargs": "reasoning",
    "reasoning_effort": "reasoning.effort",
}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _fail(field: str, expected: str, got: Any = None) -> RequestError:
    got_text = "" if got is None else f", got {got!r}"
    return with_param(RequestError(f"{field}: expected {expected}{got_text}"), field)


def _text_of(content: Any, field: str) -> str:
    """A message's text: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(field, "a string or a list of input_text parts", content)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else part
            raise _fail(
                f"{field}[{j}].type",
                "a text part (input_text or output_text): only text is supported",
                kind,
            )
        if not isinstance(part.get("text"), str):
            raise _fail(f"{field}[{j}].text", "a string", part.get("text"))
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict, key: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _fail(f"{field}.{key}", "a string", value)
    return value


def input_messages(input_: str | list) -> list[dict]:
    """The chat messages of a response's ``input``."""
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    if not input_:
        raise _fail("input", "a string or at least one item", input_)
    messages: list[dict] = []
    for i, item in enumerate(input_):
        field = f"input[{i}]"
        if not isinstance(item, dict):
            raise _fail(
                field, "an object (a message or a function_call / function_call_output item)", item
            )
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _ROLES:  # (a list is no dict key)
                raise _fail(f"{field}.role", f"one of {list(_ROLES)}", role)
            text = _text_of(item.get("content"), f"{field}.content")
            messages.append({"role": _ROLES[role], "content": text})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", field),
                "type": "function",
                "function": {
                    "name": _string(item, "name", field),
                    "arguments": _string(item, "arguments", field),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # (one turn's calls)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", field),
                    "content": _text_of(output, f"{field}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # (chat templates drop earlier turns' reasoning)
        else:
            raise _fail(
                f"{field}.type",
                "'message', 'function_call', 'function_call_output' or 'reasoning'",
                kind,
            )
    return messages


def _chat_tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise _fail(
            f"tools[{i}].type", "'function' (the only tools a self-hosted model runs)", kind
        )
    function = {"name": _string(tool, "name", f"tools[{i}]")}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


LOGPROBS_INCLUDE = "message.output_text.logprobs"
MAX_TOP_LOGPROBS = 20


def wants_logprobs(body: ResponsesRequest) -> bool:
    """The message's text parts carry each token's logprob: asked for by ``include``, or by
    asking for alternatives (``top_logprobs``)."""
    return LOGPROBS_INCLUDE in (body.include or ()) or bool(body.top_logprobs)


def _refuse_hosted_features(body: ResponsesRequest) -> None:
    if body.background:
        raise _fail("background", "false (no background responses)", body.background)
    for i, extra in enumerate(body.include or ()):
        if extra != LOGPROBS_INCLUDE:
            raise _fail(f"include[{i}]", f"{LOGPROBS_INCLUDE!r} (the only extra output)", extra)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise _fail("top_logprobs", f"0..{MAX_TOP_LOGPROBS}", body.top_logprobs)
    if body.max_tool_calls is not None:
        raise _fail("max_tool_calls", "absent (not supported)", body.max_tool_calls)
    if body.service_tier not in SERVICE_TIERS:
        raise _fail("service_tier", "'auto' or 'default'", body.service_tier)
    extra = sorted(set(body.reasoning or {}) - {"effort", "summary"})
    if extra:
        raise _fail(f"reasoning.{extra[0]}", "only effort (and summary absent)")
    if (body.reasoning or {}).get("summary") is not None:
        raise _fail(
            "reasoning.summary", "absent (no reasoning summaries)", body.reasoning["summary"]
        )


def chat_body(body: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list]:
    """The chat of a response (after the conversation ``history`` of its previous response)
    and the conversation it continues with (its messages, less the instructions)."""
    _refuse_hosted_features(body)
    conversation = [*history, *input_messages(body.input)]
    messages = conversation
    if body.instructions is not None:
        messages = [{"role": "system", "content": body.instructions}, *conversation]
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user,
    }
    if body.tools:
        fields["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(body.tools)]
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _fail(
                "tool_choice",
                "'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
                choice,
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    fields["tool_choice"] = choice
    form = (body.text or {}).get("format")
    if body.text is not None and set(body.text) - {"format", "verbosity"}:
        raise _fail("text", "only format", sorted(body.text))
    if (body.text or {}).get("verbosity") not in (None, "medium"):
        raise _fail("text.verbosity", "'medium' or absent (not supported)", body.text["verbosity"])
    if form is not None:
        if not isinstance(form, dict):
            raise _fail("text.format", "an object", form)
        kind = form.get("type")
        if kind == "json_schema":
            schema = {k: form[k] for k in ("name", "schema", "strict") if k in form}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind in ("text", "json_object"):
            fields["response_format"] = {"type": kind}
        else:
            raise _fail("text.format.type", "'text', 'json_object' or 'json_schema'", kind)
    if body.truncation == "auto":
        fields["truncate_prompt_tokens"] = -1
    if wants_logprobs(body):
        fields["logprobs"], fields["top_logprobs"] = True, body.top_logprobs or 0
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:
        fields["reasoning_effort"] = effort
    try:
        chat = ChatCompletionRequest.model_validate(
            {k: v for k, v in fields.items() if v is not None}
        )
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise renamed(with_param(RequestError(f"{where}: {error['msg']}"), where)) from None
    return chat, conversation


def renamed(error: JaxloraError) -> JaxloraError:
    """An error about the chat a response became, naming the Responses field instead (a
    message's index is the chat's, so ``messages[2].content`` becomes ``input``)."""
    return renamed_param(error, _FIELDS)


def output_items(
    message: dict, finish_reason: str, logprobs: list[dict] | None = None
) -> list[dict]:
    """A chat answer's output items: its reasoning, its text (with ``logprobs``, the chat's
    entries of its tokens), its tool calls."""
    items = []
    reasoning = message.get("reasoning_content")
    if reasoning:
        items.append(_reasoning_item(reasoning))
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if content or not calls:
        items.append(_message_item(content or "", status_of(finish_reason), logprobs))
    for call in calls:
        items.append(
            _call_item(call["id"], call["function"]["name"], call["function"]["arguments"])
        )
    return items


def _reasoning_item(text: str, status: str = "completed") -> dict:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {
        "type": "reasoning",
        "id": _new_id("rs"),
        "summary": [],
        "content": content,
        "status": status,
    }


def _message_item(text: str | None, status: str, logprobs: list[dict] | None = None) -> dict:
    content = [] if text is None else [_text_part(text, logprobs)]
    return {
        "type": "message",
        "id": _new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def assistant_message(output: list[dict]) -> dict:
    """The chat message of a response's output (for the conversation a later response
    continues)."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "message":
            message["content"] = "".join(p["text"] for p in item["content"])
        elif item["type"] == "function_call":
            call = {"name": item["name"], "arguments": item["arguments"]}
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
    return message


def usage(
    prompt_tokens: int, output_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0
) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + output_tokens,
    }


def response_object(
    body: ResponsesRequest,
    response_id: str,
    created: int,
    status: str,
    output: list[dict],
    usage_: dict | None,
) -> dict:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": body.model,
        "output": output,
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": body.truncation or "disabled",
        "usage": usage_,
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
    }


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def input_items(input_: str | list) -> list[dict]:
    """A response's ``input`` as the items ``GET /v1/responses/{id}/input_items`` lists (each
    with an id; a string is a user message). The input was checked by ``input_messages``."""
    if isinstance(input_, str):
        input_ = [{"role": "user", "content": input_}]
    items = []
    for item in input_:
        kind = item.get("type", "message")
        if kind == "message":
            content = item["content"]
            if item["role"] == "assistant":
                given = item.get("id")
                item = _message_item(_text_of(content, "input"), "completed")
                item["id"] = given or item["id"]  # (an earlier output's id, sent back)
            else:
                parts = (
                    [{"type": "input_text", "text": content}]
                    if isinstance(content, str)
                    else content
                )
                item = {
                    "type": "message",
                    "id": item.get("id") or _new_id("msg"),
                    "role": item["role"],
                    "status": "completed",
                    "content": parts,
                }
        elif kind == "function_call":
            item = {
                **_call_item(item["call_id"], item["name"], item["arguments"]),
                "id": item.get("id") or _new_id("fc"),
            }
        elif kind == "function_call_output":
            item = {
                "type": "function_call_output",
                "id": item.get("id") or _new_id("fco"),
                "call_id": item["call_id"],
                "output": item["output"],
                "status": "completed",
            }
        else:
            item = {**item, "id": item.get("id") or _new_id("rs")}
        items.append(item)
    return items


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict
    conversation: list  # the chat messages it ends (for previous_response_id)
    input_items: list  # its input, as listed
    owner: str | None = None  # the name of the API key that created it (None: no keys)


class ResponseStore:
    """The most recent responses, by id, at most ``capacity`` of them. Past it the oldest
    response of the owner (API key) that holds the most goes: one tenant's traffic pushes out
    its own responses, not another's (a global LRU let it empty every other key's store)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: dict[str, StoredResponse] = {}
        # Each owner's response ids, oldest first.
        self._by_owner: dict[str | None, collections.OrderedDict[str, None]] = {}
        self._lock = threading.Lock()

    def put(self, stored: StoredResponse) -> None:
        key = stored.response["id"]
        with self._lock:
            self._forget(key)
            self._items[key] = stored
            self._by_owner.setdefault(stored.owner, collections.OrderedDict())[key] = None
            while len(self._items) > self.capacity:
                owner = max(self._by_owner, key=lambda o: len(self._by_owner[o]))
                self._forget(next(iter(self._by_owner[owner])))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._forget(response_id)

    def _forget(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        ids = self._by_owner[stored.owner]
        del ids[response_id]
        if not ids:
            del self._by_owner[stored.owner]
        return True


class ResponseEvents:
    """A streamed response's server-sent events, from the chat's pieces."""

    def __init__(self, body: ResponsesRequest, response_id: str, created: int):
        self.body, self.response_id, self.created = body, response_id, created
        self.output: list[dict] = []
        self._sequence = 0
        self._open: dict | None = None  # the output item still streaming
        self._text = ""  # its text so far (reasoning or message)
        self._logprobs: list[dict] = []  # a message's token logprobs so far
        self._held: list[dict] = []  # logprobs of tokens with no text before any item
        self._calls: dict[int, dict] = {}  # the call items by their chat index

    def _event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def _response(self, status: str, usage_: dict | None = None) -> dict:
        return response_object(
            self.body, self.response_id, self.created, status, self.output, usage_
        )

    def start(self) -> list[str]:
        response = self._response("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def _add(self, item: dict) -> list[str]:
        events = self._close()
        self.output.append(item)
        self._open, self._text, self._logprobs = item, "", []
        events.append(
            self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)
        )
        return events

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1}

    def reasoning(self, text: str) -> list[str]:
        self._held = []  # (the opening tag's tokens: reasoning's, as the usage counts them)
        events = []
        if self._open is None or self._open["type"] != "reasoning":
            events += self._add(_reasoning_item("", "in_progress"))
        self._text += text
        events.append(
            self._event(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=text
            )
        )
        return events

    def _open_message(self) -> list[str]:
        events = self._add(_message_item(None, "in_progress"))
        events.append(
            self._event(
                "response.content_part.added",
                **self._where(),
                content_index=0,
                part=_text_part(""),
            )
        )
        return events

    def content(self, text: str, logprobs: list[dict] | None = None) -> list[str]:
        """Message text, with its tokens' logprobs (the chat's entries) where asked for.
        Tokens with no text open no message (the whole answer has none of them): those in a
        reasoning item (its tags: reasoning, as the usage counts them) are dropped, those
        before any item (text a parser holds back) go with the message that opens next."""
        logprobs = logprobs or []
        events = []
        if self._open is None or self._open["type"] != "message":
            if not text:
                if self._open is None:
                    self._held += logprobs
                return []
            events += self._open_message()
            logprobs, self._held = [*self._held, *logprobs], []
        self._text += text
        self._logprobs += logprobs
        events.append(
            self._event(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=text,
                logprobs=logprobs,
            )
        )
        return events

    def call_deltas(self, deltas: list[dict]) -> list[str]:
        """OpenAI chat tool-call deltas (the first of a call with its id and name)."""
        events = []
        for delta in deltas:
            function = delta.get("function") or {}
            if delta.get("id"):
                item = _call_item(delta["id"], function.get("name", ""), "", "in_progress")
                events += self._add(item)
                self._calls[delta["index"]] = item
            arguments = function.get("arguments") or ""
            item = self._calls[delta["index"]]
            if arguments:
                item["arguments"] += arguments
                where = {"item_id": item["id"], "output_index": self.output.index(item)}
                events.append(
                    self._event("response.function_call_arguments.delta", **where, delta=arguments)
                )
        return events

    def _close(self, status: str = "completed") -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.output.index(item)}
        events = []
        if item["type"] == "reasoning":
            events.append(
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=self._text
                )
            )
            item["content"] = [{"type": "reasoning_text", "text": self._text}]
        elif item["type"] == "message":
            part = _text_part(self._text, self._logprobs)
            events.append(
                self._event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=self._text,
                    logprobs=self._logprobs,
                )
            )
            events.append(
                self._event("response.content_part.done", **where, content_index=0, part=part)
            )
            item["content"] = [part]
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = status if item["type"] == "message" else "completed"
        events.append(
            self._event("response.output_item.done", output_index=where["output_index"], item=item)
        )
        return events

    def finish(self, finish_reason: str, usage_: dict) -> tuple[list[str], dict]:
        """The closing events and the whole response."""
        status = status_of(finish_reason)
        events = []
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            events += self._open_message()  # (an empty answer: an empty message, as whole)
            if self._held:
                held, self._held = self._held, []
                events += self.content("", held)
        events += self._close(status)  # (each item before it was closed when the next came)
        response = self._response(status, usage_)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=response))
        return events, response

    def error(self, payload: dict) -> list[str]:
        """An error after the stream started (``payload``: the error's OpenAI body)."""
        error = payload.get("error", payload)
        return [
            self._event(
                "error",
                code=error.get("code"),
                message=error.get("message", ""),
                param=error.get("param"),
            )
        ]


__all__ = [
    "ResponseEvents",
    "ResponseStore",
    "StoredResponse",
    "input_items",
    "assistant_message",
    "chat_body",
    "input_messages",
    "output_items",
    "renamed",
    "response_object",
    "status_of",
    "usage",
]

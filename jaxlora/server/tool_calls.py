"""Tool calls in a chat model's text: the two formats instruct models use most, read back.

``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen
and others), after optional text. ``llama3_json``: the whole answer is one or more JSON objects
``{"name": ..., "parameters": {...}}`` separated by ``;`` (Llama 3.1/3.2 instruct's JSON tool
calling), optionally after ``<|python_tag|>``. An answer that looks like a call but does not
parse stays text: a client never loses what the model said.

``ToolCallStream`` does the same on streamed text. It hands out text that cannot be the start
of a call, and keeps the rest until the end, when it parses it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

PARSERS = ("hermes", "llama3_json")
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it

    def to_openai(self, index: int | None = None) -> dict:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _call(obj, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(_HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for block in _HERMES_BLOCK.findall(text, start):
        try:
            call = _call(json.loads(block), "arguments")
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return text[:start].strip() or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return None, calls


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(the text that is not a call, None if none is left; the calls). No calls: the text as
    it is."""
    return (_hermes if parser == "hermes" else _llama3_json)(text)


class ToolCallStream:
    """``parse_tool_calls`` on streamed text: ``push(delta)`` returns the text that can be
    streamed now; ``finish()`` returns (text held back, calls) once the answer is complete."""

    def __init__(self, parser: str):
        self.parser = parser
        self._held = ""  # text that may be (the start of) a call
        self._calling = False  # a call has started: everything from there is held
        self._plain = False  # llama3_json: the answer did not open like a call

    def push(self, delta: str) -> str:
        if self._calling:
            self._held += delta
            return ""
        if self._plain:
            return delta
        text = self._held + delta
        if self.parser == "llama3_json":
            # Only an answer that opens like a call is one: held whole from its first character.
            stripped = text.lstrip()
            if stripped.startswith(("{", _PYTHON_TAG)):
                self._calling = True
            if self._calling or _PYTHON_TAG.startswith(stripped):  # (or not decided yet)
                self._held = text
                return ""
            self._held, self._plain = "", True
            return text
        start = text.find(_HERMES_START)
        if start >= 0:
            self._calling = True
            self._held = text[start:]
            return text[:start]
        keep = _partial_suffix(text, _HERMES_START)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def call_deltas(self) -> list[dict]:
        """Tool-call deltas to stream now: none (the calls come whole from ``finish``)."""
        return []

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        if not self._calling:
            return held, []
        content, calls = parse_tool_calls(held, self.parser)
        if not calls:
            return held, []
        # (hermes: text between the answer's start and the first call was streamed already)
        return (content or "") if self.parser == "llama3_json" else "", calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ForcedToolCalls:
    """A call the request forces (``tool_choice`` ``"required"`` or a named function), made by
    constrained decoding rather than read back from free text: the answer is JSON that a schema
    built from the tools admits. Named: the function's arguments (its ``parameters`` schema);
    required: a non-empty array of ``{"name": ..., "parameters": {...}}`` of any offered tool.

    It streams like ``ToolCallStream``: ``push`` takes the text. A named call's arguments are
    streamed as they come (``call_deltas``: the first delta carries the call's id and name, as
    OpenAI's stream does); the calls of ``required`` come whole from ``finish`` (or the text,
    if the answer was cut short by max_tokens and does not parse)."""

    def __init__(self, tools: list[dict], tool_choice):
        self._held = ""
        self._pending: list[dict] = []  # a named call's argument deltas not streamed yet
        self._call_id: str | None = None
        functions = {tool["function"]["name"]: tool["function"] for tool in tools}
        if tool_choice == "required":
            self.name = None
            choices = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": name},
                        "parameters": _parameters_schema(function),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, function in functions.items()
            ]
            self.schema = {"type": "array", "minItems": 1, "items": {"anyOf": choices}}
            self.finish_reason = "tool_calls"
            return
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError(
                "expected 'auto', 'none', 'required' or {'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {tool_choice!r}"
            )
        if name not in functions:
            raise ValueError(f"function {name!r} is not among the tools ({sorted(functions)})")
        self.name = name
        self.schema = _parameters_schema(functions[name])
        # (OpenAI answers a forced named call with finish reason "stop")
        self.finish_reason = "stop"

    def parse(self, text: str) -> list[ToolCall]:
        """The calls in a complete answer; [] if it does not parse (cut short)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return []
        if self.name is not None:
            # The arguments as the model wrote them: what the stream sent, piece by piece.
            return [ToolCall(self.name, text.strip())] if isinstance(value, dict) else []
        if not isinstance(value, list):
            return []
        calls = [_call(item, "parameters") for item in value]
        return [] if None in calls else calls

    def push(self, delta: str) -> str:
        self._held += delta
        if self.name is not None and delta:
            if self._call_id is None:
                self._call_id = f"call_{uuid.uuid4().hex[:24]}"
                function = {"name": self.name, "arguments": delta}
                self._pending.append(
                    {"index": 0, "id": self._call_id, "type": "function", "function": function}
                )
            else:
                self._pending.append({"index": 0, "function": {"arguments": delta}})
        return ""

    def call_deltas(self) -> list[dict]:
        pending, self._pending = self._pending, []
        return pending

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        if self.name is not None:
            return "", []  # (its arguments went out as they came)
        calls = self.parse(held)
        return ("", calls) if calls else (held, [])


def _parameters_schema(function: dict) -> dict:
    parameters = function.get("parameters")
    # (a function without parameters takes an empty object)
    return parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}

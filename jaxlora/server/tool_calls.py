"""Tool calls in a chat model's text: the formats instruct models use most, read back.

``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen
and others), after optional text. ``llama3_json``: the whole answer is one or more JSON objects
``{"name": ..., "parameters": {...}}`` separated by ``;`` (Llama 3.1/3.2 instruct's JSON tool
calling), optionally after ``<|python_tag|>``. ``mistral``: after optional text,
``[TOOL_CALLS]`` and a JSON list of ``{"name": ..., "arguments": {...}}`` (Mistral's v3 to v7
tokenizers), or ``[TOOL_CALLS]name[ARGS]{...}`` once a call (v11 and later); ``[TOOL_CALLS]`` is
a special token, so the server keeps special tokens in the text of requests this parser reads.
``pythonic``: the whole answer is a Python list of calls with keyword arguments,
``[get_weather(city="Paris"), now()]`` (Llama 3.2 and 4), optionally between
``<|python_start|>`` and ``<|python_end|>``; the values are literals. An answer that looks like
a call but does not parse stays text: a client never loses what the model said.

``ToolCallStream`` does the same on streamed text. It hands out text that cannot be the start
of a call, and keeps the rest until the end, when it parses it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
# A block, or the last one left open (the answer cut short, or ended without the closing tag),
# as vLLM's parser reads them.
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>|<tool_call>\s*(.*)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_START, _MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
_PYTHON_START, _PYTHON_END = "<|python_start|>", "<|python_end|>"
# Parsers whose calls start at a marker after optional text (the text before it streams) and
# parsers whose whole answer is the calls (held from its first character when it opens so).
_MARKERS = {"hermes": _HERMES_START, "mistral": _MISTRAL_START}
_OPENINGS = {"llama3_json": ("{", _PYTHON_TAG), "pythonic": ("[", _PYTHON_START)}
# Parsers whose markers are special tokens, which the text keeps only if asked.
KEEPS_SPECIAL_TOKENS = ("mistral",)


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


def _json_text(arguments: dict) -> str:
    """The arguments as JSON text: non-ASCII characters as they are, unless a lone surrogate
    (a model's "\\ud83d" without its pair) would make the answer unencodable as UTF-8."""
    text = json.dumps(arguments, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(arguments)
    return text


def _call(obj, arguments_key: str, *, require_arguments: bool = False) -> ToolCall | None:
    """A call's object: a name and its arguments (under arguments_key or "arguments"; none:
    {} inside a call's markers, and no call where the whole answer is JSON,
    ``require_arguments``: ``{"name": "Alice", "age": 30}`` is data, as vLLM reads it)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if require_arguments and arguments_key not in obj and "arguments" not in obj:
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], _json_text(arguments))


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(_HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for closed, left_open in _HERMES_BLOCK.findall(text, start):
        try:
            call = _call(json.loads(closed or left_open), "arguments")
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    # (the text before the call as it is, as it streams and as vLLM answers)
    return text[:start] or None, calls


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
        call = _call(obj, "parameters", require_arguments=True)
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return None, calls


def _mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(_MISTRAL_START)
    if start < 0:
        return text, []
    rest = text[start + len(_MISTRAL_START) :].strip()
    calls = []
    if rest.startswith("["):  # [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
        try:
            listed = json.loads(rest)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(listed, list) or not listed:
            return text, []
        calls = [_call(obj, "arguments") for obj in listed]
    else:  # name[ARGS]{...} after each [TOOL_CALLS]
        for piece in rest.split(_MISTRAL_START):
            name, marker, arguments = piece.partition(_MISTRAL_ARGS)
            if not marker:
                return text, []
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                return text, []
            calls.append(_call({"name": name.strip(), "arguments": parsed}, "arguments"))
    if any(call is None for call in calls):
        return text, []
    return text[:start] or None, calls


def _pythonic(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(_PYTHON_START):
        body = body[len(_PYTHON_START) :].removesuffix(_PYTHON_END).strip()
    if not body.startswith("["):
        return text, []
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError):
        return text, []
    if not isinstance(tree, ast.List) or not tree.elts:
        return text, []
    calls = []
    for node in tree.elts:
        if (
            not isinstance(node, ast.Call)
            or not isinstance(node.func, (ast.Name, ast.Attribute))
            or node.args
            or any(k.arg is None for k in node.keywords)
        ):
            return text, []
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            encoded = _json_text(arguments)
        except (ValueError, TypeError, SyntaxError):
            return text, []
        calls.append(ToolCall(ast.unparse(node.func), encoded))
    return None, calls


_PARSE = {
    "hermes": _hermes,
    "llama3_json": _llama3_json,
    "mistral": _mistral,
    "pythonic": _pythonic,
}


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(the text that is not a call, None if none is left; the calls). No calls: the text as
    it is."""
    try:
        return _PARSE[parser](text)
    except (ValueError, RecursionError):
        # Python's readers refuse numbers past 4,300 digits (a model repeating a digit until
        # max_tokens) and nesting past the recursion limit: not a call, the text stays.
        return text, []


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
        openings = _OPENINGS.get(self.parser)
        if openings is not None:
            # Only an answer that opens like a call is one: held whole from its first character.
            stripped = text.lstrip()
            if stripped.startswith(openings):
                self._calling = True
            if self._calling or any(o.startswith(stripped) for o in openings):  # (undecided)
                self._held = text
                return ""
            self._held, self._plain = "", True
            return text
        marker = _MARKERS[self.parser]
        start = text.find(marker)
        if start >= 0:
            self._calling = True
            self._held = text[start:]
            return text[:start]
        keep = _partial_suffix(text, marker)
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
        # (a marker's parser: the text before the first call was streamed already)
        return ("" if self.parser in _MARKERS else content or ""), calls


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
    required: a non-empty array of ``{"name": ..., "parameters": {...}}`` of any offered tool
    (of one, where ``parallel`` is false).

    It streams like ``ToolCallStream``: ``push`` takes the text. A named call's arguments are
    streamed as they come (``call_deltas``: the first delta carries the call's id and name, as
    OpenAI's stream does); the calls of ``required`` come whole from ``finish`` (or the text,
    if the answer was cut short by max_tokens and does not parse)."""

    def __init__(self, tools: list[dict], tool_choice, *, parallel: bool = True):
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
            if not parallel:  # (parallel_tool_calls: false)
                self.schema["maxItems"] = 1
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
        """The calls in an answer: a named call's whatever the text (cut short by max_tokens
        too: its stream sent it as the call's arguments, as vLLM answers); required's [] if it
        does not parse (cut short)."""
        if self.name is not None:
            # The arguments as the model wrote them: what the stream sent, piece by piece.
            return [ToolCall(self.name, text.strip())]
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # (JSONDecodeError, or past Python's limits)
            return []
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

"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, runtime adapter loading,
health and Prometheus metrics. OpenAPI schema at /openapi.json, docs at /docs.

``model`` in a request names the base model (ServerConfig.model_name) or a registered adapter;
requests for different adapters share the engine's batches. Every failure is an OpenAI-style
error answer (jaxlora.server.errors); a client that disconnects cancels its requests, which frees
their KV pages and adapter references at the engine's next step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated

import anyio.to_thread
import jax
import jax.numpy as jnp
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxlora import __version__ as jaxlora_version
from jaxlora.engine import Delta, FinishReason
from jaxlora.engine import Request as EngineRequest
from jaxlora.engine.engine import check_prompt_length
from jaxlora.errors import (
    AdapterError,
    FormatError,
    JaxloraError,
    PoolExhaustedError,
    RequestError,
    UnknownAdapterError,
)
from jaxlora.sampling import MAX_LOGPROBS, SamplingParams
from jaxlora.server import lorax, responses
from jaxlora.server import metrics as prom
from jaxlora.server.errors import (
    AuthenticationError,
    EngineRequestError,
    ErrorJSONResponse,
    NotFoundError,
    PermissionDeniedError,
    describe,
    error_response,
    exception_response,
    tgi_error,
    with_param,
)
from jaxlora.server.generation import RequestGroup
from jaxlora.server.keys import ApiKey, find_key
from jaxlora.server.protocol import (
    SERVICE_TIERS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    ResponsesRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from jaxlora.server.reasoning import (
    REASONING_PARSERS,
    ReasoningStream,
    grammar_start,
    prompt_closes_reasoning,
    prompt_opens_reasoning,
    reasoning_token_count,
    split_reasoning,
)
from jaxlora.server.state import ServingState
from jaxlora.server.tool_calls import (
    KEEPS_SPECIAL_TOKENS,
    ForcedToolCalls,
    ToolCallStream,
    parse_tool_calls,
)
from jaxlora.structured_output import JSON_OBJECT_SCHEMA, ReasoningTokens, StructuredOutput

log = logging.getLogger("jaxlora.server")

_SEED_LIMIT = 2**63
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/models",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
)


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


# ---------------------------------------------------------------------------- request checks


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    def refuse(field: str, why: str):
        raise with_param(RequestError(f"{field}: {why}"), field)

    if body.stream_options is not None and not body.stream:
        refuse("stream_options", "only allowed with stream=true")
    if body.service_tier not in SERVICE_TIERS:
        refuse("service_tier", f"expected 'auto' or 'default', got {body.service_tier!r}")
    effort = getattr(body, "reasoning_effort", None)
    if effort is not None and "reasoning_effort" in (body.chat_template_kwargs or {}):
        refuse("reasoning_effort", "given twice (also in chat_template_kwargs); give it once")
    if body.truncate_prompt_tokens is not None and not (
        body.truncate_prompt_tokens >= 1 or body.truncate_prompt_tokens == -1
    ):
        refuse(
            "truncate_prompt_tokens",
            f"expected an int >= 1, or -1 (the context length), got {body.truncate_prompt_tokens}",
        )
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != body.n:
            refuse(
                "best_of", f"only None or equal to n ({body.n}) is supported, got {body.best_of!r}"
            )
        if body.suffix is not None:
            refuse("suffix", "not supported")
    else:
        if body.tool_choice not in (None, "none", "auto") and not body.tools:
            refuse("tool_choice", f"{body.tool_choice!r} needs tools")
        for i, tool in enumerate(body.tools or ()):
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                tool.get("type") != "function"
                or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not function["name"]
            ):
                raise with_param(
                    RequestError(
                        f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                        f"'parameters': ...}}}}, got {tool!r}"
                    ),
                    f"tools[{i}]",
                )
        if (
            body.continue_final_message
            and body.add_generation_prompt
            and "add_generation_prompt" in body.model_fields_set
        ):
            refuse(
                "continue_final_message",
                "cannot continue the final message and add a generation prompt after it; set "
                "add_generation_prompt to false",
            )
        if body.top_logprobs and not body.logprobs:  # (0 asks for nothing, as vLLM reads it)
            refuse("top_logprobs", "needs logprobs=true")
        if body.prompt_logprobs is not None and body.stream:
            refuse("prompt_logprobs", "only without stream on chat completions")


def forced_tool_calls(body: ChatCompletionRequest) -> ForcedToolCalls | None:
    """The call a chat request forces (tool_choice 'required' or a named function), if any."""
    if not body.tools or body.tool_choice in (None, "none", "auto"):
        return None
    try:
        return ForcedToolCalls(
            body.tools, body.tool_choice, parallel=body.parallel_tool_calls is not False
        )
    except ValueError as e:
        raise with_param(RequestError(f"tool_choice: {e}"), "tool_choice") from None


def _structured_output(
    body: CompletionRequest | ChatCompletionRequest, forced: ForcedToolCalls | None = None
) -> StructuredOutput | None:
    """The constraint on a request's output: from response_format (OpenAI's), from
    structured_outputs or a guided_* field (vLLM's), or from a forced tool call; at most one.
    A spec that does not compile is a 400 naming its field."""
    found: list[tuple[str, str, object]] = []  # (field, kind, spec)
    compact = False
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", "json", JSON_OBJECT_SCHEMA))
        elif response_format.type == "json_schema":
            schema = (response_format.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise with_param(
                    RequestError(
                        "response_format.json_schema: expected {'name': ..., 'schema': {...}}, "
                        f"got {response_format.json_schema!r}"
                    ),
                    "response_format",
                )
            found.append(("response_format", "json", schema))
        else:
            raise with_param(
                RequestError(
                    "response_format: expected type 'text', 'json_object' or 'json_schema', "
                    f"got {response_format.type!r}"
                ),
                "response_format",
            )
    if body.structured_outputs is not None:
        given = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        compact = given.pop("disable_any_whitespace")
        if given.get("json_object") is False:
            del given["json_object"]
        if len(given) != 1:
            raise with_param(
                RequestError(
                    "structured_outputs: expected exactly one of json, regex, choice, grammar "
                    f"and json_object, got {sorted(given) or 'none'}"
                ),
                "structured_outputs",
            )
        ((kind, spec),) = given.items()
        if kind == "json_object":
            kind, spec = "json", JSON_OBJECT_SCHEMA
        found.append((f"structured_outputs.{kind}", kind, spec))
    for kind in ("json", "regex", "choice", "grammar"):
        spec = getattr(body, f"guided_{kind}")
        if spec is not None:
            found.append((f"guided_{kind}", kind, spec))
    if forced is not None:
        # (compact: the arguments are read by a program, and re-serialized anyway)
        found.append(("tool_choice", "json", forced.schema))
        compact = True
    if len(found) > 1:
        fields = [field for field, _, _ in found]
        raise with_param(
            RequestError(f"{', '.join(fields)}: expected at most one constraint on the output"),
            fields[1].split(".")[0],
        )
    if not found:
        return None
    field, kind, spec = found[0]
    try:
        return StructuredOutput(kind, spec, field=field, compact=compact and kind == "json")
    except RequestError as e:
        raise with_param(e, field.split(".")[0]) from None


def _most(*values: int | None) -> int | None:
    """The largest of the values that are not None (None if all are)."""
    given = [v for v in values if v is not None]
    return max(given) if given else None


def _first(tops: list[dict | None], n: int) -> list[dict | None]:
    """Each position's n most likely entries (the engine recorded as many as the request's
    largest ask)."""
    return [None if top is None else dict(list(top.items())[:n]) for top in tops]


def _samplings(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs,
    count: int,
    max_stop_strings: int,
    prompt_logprobs: int | None = None,
    structured_output: StructuredOutput | None = None,
    reasoning_tokens: ReasoningTokens | None = None,
    defaults: Mapping[str, float | int] | None = None,
    max_logprobs: int = MAX_LOGPROBS,
) -> list[SamplingParams]:
    """One SamplingParams per choice (choice i of a seeded request uses seed + i). defaults:
    what an unset temperature, top_p, top_k, min_p or repetition_penalty takes instead of
    OpenAI's (ServerConfig.sampling_defaults). max_logprobs: the most logprobs a token the
    request may ask for (ServerConfig.max_logprobs)."""
    defaults = defaults or {}
    logprobs_field = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
    for field, asked in ((logprobs_field, logprobs), ("prompt_logprobs", prompt_logprobs)):
        if asked is not None and asked > max_logprobs:
            raise with_param(
                RequestError(
                    f"{field}: expected an int in 0..{max_logprobs} (logprobs a token; this "
                    f"server's --max_logprobs), got {asked}"
                ),
                field,
            )

    def given_or_default(name: str, openai_default):
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, openai_default)

    stop = body.stop if body.stop is not None else ()
    if isinstance(stop, str):
        stop = (stop,)
    if len(stop) > max_stop_strings:
        raise with_param(
            RequestError(
                f"stop: expected at most {max_stop_strings} stop strings, got {len(stop)}"
            ),
            "stop",
        )
    if body.seed is not None and not -_SEED_LIMIT <= body.seed < _SEED_LIMIT:
        raise with_param(
            RequestError(f"seed: expected an int in [-2**63, 2**63), got {body.seed}"), "seed"
        )
    logit_bias = {}
    for key, bias in (body.logit_bias or {}).items():
        # JSON object keys are strings: OpenAI's are token ids written in decimal.
        if not re.fullmatch(r"[0-9]{1,10}", key):
            raise with_param(
                RequestError(
                    f"logit_bias: expected token ids (decimal strings) as keys, got {key!r}"
                ),
                "logit_bias",
            )
        logit_bias[int(key)] = bias
    out = []
    for i in range(count):
        # (-1: vLLM's "no seed")
        seed = None if body.seed in (None, -1) else (body.seed + i) % _SEED_LIMIT
        try:
            out.append(
                SamplingParams(
                    temperature=given_or_default("temperature", 1.0),
                    top_p=given_or_default("top_p", 1.0),
                    top_k=given_or_default("top_k", 0),
                    max_tokens=max_tokens,
                    stop_token_ids=tuple(body.stop_token_ids or ()),
                    stop_strings=tuple(stop),
                    seed=seed,
                    logprobs=logprobs,
                    ignore_eos=body.ignore_eos,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=given_or_default("repetition_penalty", 1.0),
                    logit_bias=logit_bias,
                    min_p=given_or_default("min_p", 0.0),
                    min_tokens=body.min_tokens or 0,
                    prompt_logprobs=prompt_logprobs,
                    include_stop_str_in_output=body.include_stop_str_in_output,
                    structured_output=structured_output,
                    bad_words=tuple(body.bad_words or ()),
                    reasoning_tokens=reasoning_tokens,
                    allowed_token_ids=body.allowed_token_ids,
                    skip_special_tokens=body.skip_special_tokens,
                )
            )
        except RequestError as e:
            field = str(e).split("'")[1] if str(e).startswith("sampling parameter '") else None
            raise with_param(e, {"stop_strings": "stop"}.get(field, field)) from None
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(value, path: str, param: str) -> None:
    """JSON can spell lone UTF-16 surrogates ("\\ud800"), which are no text: the tokenizer
    cannot take them, nor can a UTF-8 answer that quotes them."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise with_param(
                RequestError(
                    f"{path}: expected valid Unicode text, got a lone surrogate "
                    f"{found.group()!r} at index {found.start()}"
                ),
                param,
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, f"{path} (a key)", param)
            _refuse_lone_surrogates(item, f"{path}.{key}", param)
    elif isinstance(value, list) and not all(type(item) is int for item in value):
        # (lists of token ids, maybe millions long, get one quick look)
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{path}[{i}]", param)
    elif isinstance(value, BaseModel):
        _refuse_lone_surrogates(value.model_dump(exclude_none=True), path, param)


def _check_text(body: BaseModel) -> None:
    """Refuses a body whose strings are not all valid Unicode text (400 naming the field)."""
    for field in type(body).model_fields:
        _refuse_lone_surrogates(getattr(body, field), field, field)


# ---------------------------------------------------------------------------- formatting


class _Formatter:
    """Token text and logprob blocks (OpenAI's completion and chat shapes)."""

    def __init__(self, tokenizer, *, token_ids: bool = False):
        self.tokenizer = tokenizer
        self.token_ids = token_ids  # tokens as "token_id:<id>" (vLLM's)

    def of(self, body) -> _Formatter:
        """This formatter, or one that writes tokens as their ids where the request asks
        (vLLM's ``return_tokens_as_token_ids``)."""
        if getattr(body, "return_tokens_as_token_ids", False):
            return _Formatter(self.tokenizer, token_ids=True)
        return self

    def token_text(self, token_id: int) -> str:
        if self.token_ids:
            return f"token_id:{token_id}"
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, token_ids, logprobs, tops, offset: int) -> tuple[dict, int]:
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        # (None for a prompt's first token, which has no logprob.) The token itself is among
        # its position's alternatives, as OpenAI's legacy API and vLLM give it: up to
        # logprobs + 1 of them, the token alone for logprobs=0.
        top = []
        for i, entry in enumerate(tops or [{}] * len(tokens)):
            if entry is None:
                top.append(None)
                continue
            alternatives = {self.token_text(t): lp for t, lp in entry.items()}
            if logprobs and logprobs[i] is not None:
                alternatives.setdefault(tokens[i], logprobs[i])
            top.append(alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs or []),
            "top_logprobs": top,
            "text_offset": offsets,
        }, offset

    def chat_logprobs(self, token_ids, logprobs, tops) -> dict:
        content = []
        for i, token in enumerate(token_ids):
            text = self.token_text(token)
            alternatives = [
                {
                    "token": self.token_text(t),
                    "logprob": lp,
                    "bytes": list(self.token_text(t).encode()),
                }
                for t, lp in ((tops[i] if tops else None) or {}).items()
            ]
            content.append(
                {
                    "token": text,
                    "logprob": logprobs[i],
                    "bytes": list(text.encode()),
                    "top_logprobs": alternatives,
                }
            )
        return {"content": content}

    def prompt_logprobs(self, request: EngineRequest, n: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (None for the first), its id (a string) and
        the n most likely ids there, each to its logprob, rank and text."""
        out = []
        for i, token in enumerate(request.prompt_ids):
            logprob = request.prompt_logprobs[i]
            if logprob is None:
                out.append(None)
                continue
            entry = {
                str(token): {
                    "logprob": logprob,
                    "rank": request.prompt_logprob_ranks[i],
                    "decoded_token": self.token_text(token),
                }
            }
            for rank, (t, lp) in enumerate(list(request.prompt_top_logprobs[i].items())[:n], 1):
                entry.setdefault(
                    str(t), {"logprob": lp, "rank": rank, "decoded_token": self.token_text(t)}
                )
            out.append(entry)
        return out


def _usage(
    prompt_lengths: list[int],
    requests: list[EngineRequest],
    reasoning=None,
    whole=False,
    sent: list[int] | None = None,
    cached: bool = False,
) -> dict:
    """OpenAI's usage block; ``reasoning`` (a chat's answers read by a reasoning parser: a
    function of output ids) adds ``completion_tokens_details.reasoning_tokens``. ``whole``:
    a whole (not streamed) answer's, with vLLM's ``prompt_tokens_details``: null, or with
    ``cached`` (ServerConfig.enable_prompt_tokens_details) the prompt tokens found computed,
    which a stream's last usage chunk (``sent`` None) also gets. ``sent``: each request's
    output tokens a stream has sent so far, counted instead of all of them (vLLM's
    ``continuous_usage_stats``: the engine may be ahead of the stream)."""
    outputs = [r.output_ids for r in requests]
    if sent is not None:
        outputs = [ids[:n] for ids, n in zip(outputs, sent, strict=True)]
    prompt = sum(prompt_lengths)
    completion = sum(map(len, outputs))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if whole or (cached and sent is None):
        usage["prompt_tokens_details"] = (
            {"cached_tokens": _cached_tokens(prompt_lengths, requests)} if cached else None
        )
    if reasoning is not None:
        thought = sum(reasoning(ids) for ids in outputs)
        usage["completion_tokens_details"] = {"reasoning_tokens": thought}
    return usage


def _cached_tokens(prompt_lengths: list[int], requests: list[EngineRequest]) -> int:
    """The prompt tokens whose K/V were found computed, each prompt counted once, as usage
    counts its tokens: requests are prompt-major, n a prompt, and the n choices of a prompt
    share its pages (the first computes what the prefix cache lacks, the others find it all),
    so a prompt counts its least-cached choice's."""
    per_prompt = len(requests) // max(len(prompt_lengths), 1)
    return sum(
        min(r.num_cached_tokens for r in requests[i * per_prompt : (i + 1) * per_prompt])
        for i in range(len(prompt_lengths))
    )


# Top-level fields of a whole answer that vLLM's always has (null here, as in vLLM).
_ANSWER_NULLS = {"service_tier": None, "system_fingerprint": None}


def _chat_echo(body: ChatCompletionRequest) -> str:
    """The text a chat answer starts with under vLLM's ``echo``: the last message's, when it is
    the assistant's (the message the answer continues or follows), else none."""
    last = body.messages[-1]
    if not body.echo or last.role != "assistant":
        return ""
    return _content_text(last.content)


def _answer_role(body: ChatCompletionRequest, response_role: str) -> str:
    """The role of a chat answer (vLLM's reading): ``response_role`` where the prompt asks for a
    new message, else the last message's, which the answer continues."""
    if body.add_generation_prompt and not body.continue_final_message:
        return response_role
    return body.messages[-1].role


def _content_text(content: str | list[dict] | None) -> str:
    """A message's text: its content string, or its text parts joined by newlines, as the
    tokenizer (and vLLM) joins them (none: empty)."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content or () if isinstance(p.get("text"), str))


def chat_message(
    text: str,
    finish_reason: str,
    calls_reader: str | ForcedToolCalls | None,
    max_calls: int | None = None,
) -> tuple[dict, str]:
    """A chat answer's message and finish reason: with a tool-call parser, the calls in the
    text (the first ``max_calls``: vLLM's reading of ``parallel_tool_calls: false``) become
    ``tool_calls`` (finish reason "tool_calls") and the rest its content; a forced call's
    answer (``ForcedToolCalls``) becomes its calls: a named one's always, with the answer's
    finish reason ("length" where cut short, as its stream ends), required's unless cut
    short."""
    message = {"role": "assistant", "content": text}
    if calls_reader is None:
        return message, finish_reason
    if isinstance(calls_reader, ForcedToolCalls):
        content, calls = None, calls_reader.parse(text)
        named = calls_reader.name is not None
        called = finish_reason if named else calls_reader.finish_reason
    else:
        content, calls = parse_tool_calls(text, calls_reader)
        calls = calls[:max_calls]
        called = "tool_calls"
    if not calls:
        return message, finish_reason
    message["content"] = content
    message["tool_calls"] = [call.to_openai() for call in calls]
    return message, called


def _chunk_writer(body, http_id: str, created: int, kind: str, usage_so_far):
    """An SSE chunk of a streamed answer (``kind``: its object name) with given choices. With
    ``stream_options.include_usage`` every chunk has a ``usage``: the one given (the last
    chunk's), ``usage_so_far(index)`` of its choice with ``continuous_usage_stats``, else null.
    ``fields``: more top-level fields of this chunk."""
    include_usage, continuous_usage = _usage_options(body)

    def chunk(choices: list[dict], usage=None, **fields) -> str:
        payload = {
            "id": http_id,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": choices,
            **fields,
        }
        if include_usage:
            if usage is None and continuous_usage:
                usage = usage_so_far(choices[0]["index"])
            payload["usage"] = usage
        return _sse(payload)

    return chunk


def _usage_options(body) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk too: vLLM's
    ``continuous_usage_stats``, which needs ``include_usage``)."""
    options = body.stream_options
    include = bool(options and options.include_usage)
    return include, include and options.continuous_usage_stats


def _failure(state: ServingState, request: EngineRequest) -> JaxloraError | None:
    """The error a request that did not end normally gets (None: it ended normally)."""
    reason = request.finish_reason
    if reason in (FinishReason.STOP, FinishReason.LENGTH):
        return None
    if reason is FinishReason.DEADLINE:
        return PoolExhaustedError(
            "the server is overloaded: the request could not start "
            "before its first-token deadline; retry later"
        )
    if reason is FinishReason.ABORT:
        return PoolExhaustedError("the request was cancelled by the server (shutting down)")
    if request.adapter is not None and request.adapter not in state.adapters.store:
        return with_param(
            UnknownAdapterError(
                f"The model `{request.adapter}` was unloaded before the request could start"
            ),
            "model",
        )
    if request.error_is_request:  # (its structured output's grammar)
        return with_param(RequestError(request.error), request.sampling.structured_output.field)
    return EngineRequestError(f"generation failed: {request.error}")


@dataclasses.dataclass
class _ChatRun:
    """A chat request under way (``start_chat``): its choices and how their answers are read."""

    body: ChatCompletionRequest
    group: RequestGroup
    prompt: list[int]
    parser_format: object  # the server's reasoning format (None: no parser)
    reasoning_format: object  # this answer's (None: no parser, or the prompt closed it)
    forced: ForcedToolCalls | None
    parser: str | None  # the tool-call parser where the model may call tools
    echo: str
    # The tags' token ids where the answer is read for reasoning (None: no parser, or the
    # prompt closed it), and the tokenizer that reads blank tokens before them.
    reasoning_tags: ReasoningTokens | None = None
    tokenizer: object = None

    @property
    def calls_reader(self):
        return self.forced or self.parser

    @property
    def max_calls(self) -> int | None:
        """At most one call where the request sets ``parallel_tool_calls: false``."""
        return 1 if self.body.parallel_tool_calls is False else None

    @property
    def reasoning_counter(self):
        """``reasoning_tokens`` where the server reads reasoning (None: no parser)."""
        return self.reasoning_tokens if self.parser_format is not None else None

    def reasoning_tokens(self, output_ids) -> int:
        """How many of an answer's tokens are reasoning (0 without a parser, or where the
        prompt closed the reasoning)."""
        if self.reasoning_tags is None:
            return 0
        return reasoning_token_count(self.reasoning_tags, self.tokenizer, output_ids)


# ---------------------------------------------------------------------------- the app

_bearer = HTTPBearer(auto_error=False, description="The server's API key, if it has one.")


# The API key of the request being handled (None: the server takes no keys). Set by the
# _check_api_key dependency, which runs in the endpoint's own task.
_CALLER: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("caller", default=None)


async def _check_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    keys = request.app.state.serving.api_keys()
    if not keys:
        _CALLER.set(None)
        return
    given = credentials.credentials if credentials is not None else ""
    caller = find_key(keys, given)
    if caller is None:
        raise AuthenticationError(
            "Invalid or missing API key: send the server's key as 'Authorization: Bearer <key>'"
        )
    _CALLER.set(caller)


async def _check_metrics_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """GET /metrics: an admin key where the server asks for one (metrics_need_key)."""
    if request.app.state.serving.config.metrics_need_key:
        await _check_api_key(request, credentials)
        _require_admin("read the metrics")


def _caller_may_use(model: str) -> bool:
    caller = _CALLER.get()
    return caller is None or caller.allows(model)


def _caller_name() -> str | None:
    caller = _CALLER.get()
    return None if caller is None else caller.name


def _require_admin(action: str) -> None:
    caller = _CALLER.get()
    if caller is not None and not caller.admin:
        raise PermissionDeniedError(
            f"API key {caller.name!r} may not {action}: it needs an admin key (--api_key, or "
            '"admin": true in --api_keys_file)'
        )


def create_app(
    state: ServingState,
    *,
    manage_engine: bool = True,
    warm_up: bool = False,
    background_warmup: bool = False,
    on_ready=None,
) -> FastAPI:
    """The FastAPI app serving state. With manage_engine, the app's start-up starts the engine
    (after compiling every step shape when warm_up; in the background with background_warmup)
    and its shutdown stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        switch_interval = sys.getswitchinterval()
        if state.config.switch_interval_s is not None:
            sys.setswitchinterval(state.config.switch_interval_s)
        if manage_engine:
            state.start(warm_up=warm_up, background=background_warmup, on_ready=on_ready)
        try:
            yield
        finally:
            await state.pump.close()
            if manage_engine:
                state.stop()
            sys.setswitchinterval(switch_interval)

    docs = state.config.docs
    app = FastAPI(
        title="jaxlora",
        version=jaxlora_version,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        description="OpenAI-compatible multi-LoRA server: `model` is the base model or "
        "any registered adapter; requests for different adapters share every batch.",
    )
    app.state.serving = state
    formatter = _Formatter(state.tokenizer, token_ids=state.config.return_tokens_as_token_ids)

    # ------------------------------------------------------------------ errors

    def in_route_shape(request: Request, response: JSONResponse) -> JSONResponse:
        return _in_route_shape(request.url.path, request.method, response)

    @app.exception_handler(JaxloraError)
    async def jaxlora_error(request: Request, error: JaxloraError):
        return in_route_shape(request, exception_response(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        loc = _loc_in_body(first)
        message = first.get("msg", "invalid request")
        # A field of several accepted types (prompt, stop, ...): pydantic reports one problem
        # per type, under the type's name; one message at the field says it all.
        union = next((i for i, part in enumerate(loc) if _is_union_member(part)), None)

        def in_union(problem) -> bool:
            at = _loc_in_body(problem)
            return len(at) > union and at[:union] == loc[:union] and _is_union_member(at[union])

        members = []
        if union is not None:
            members = list(dict.fromkeys(_loc_in_body(p)[union] for p in problems if in_union(p)))
        if len(members) > 1:  # (one alone: a map's key that looks like a type's name)
            accepted = [_UNION_MEMBER_WORDS.get(m, m) for m in members]
            loc = loc[:union]
            expected = ", ".join(accepted[:-1]) + " or " + accepted[-1]
            message = f"expected {expected}, got {_shown(error.body, loc)}"
            problems = [first, *(p for p in problems if not in_union(p))]
        elif not loc and isinstance(error.body, bytes):
            # FastAPI reads a body as JSON only where its Content-Type says so (curl -d sends a
            # form's, requests' data= none); vLLM too takes application/json only.
            given = request.headers.get("content-type")
            got = f"Content-Type {given!r}" if given else "no Content-Type"
            message = f"expected a JSON object sent with Content-Type: application/json, got {got}"
        elif first.get("type", "").endswith("_type"):  # a value of the wrong JSON type
            message = f"{message}, got {_shown(error.body, loc)}"
        field = _field_name(loc)
        if first.get("type") == "extra_forbidden":
            message = "unknown field (not supported by this server)"
        elif first.get("type") == "json_invalid":
            field, message = "body", f"not valid JSON ({first.get('ctx', {}).get('error', '')})"
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return in_route_shape(
            request, error_response(400, f"{field}: {message}{more}", param=field)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        cause = error.__cause__
        if error.status_code == 400 and cause is not None:
            # FastAPI's "There was an error parsing the body": say why (nested too deeply,
            # not UTF-8, ...).
            return in_route_shape(
                request,
                error_response(
                    400, f"body: not valid JSON ({type(cause).__name__}: {cause})", param="body"
                ),
            )
        param = "body" if error.status_code == 413 else None
        return in_route_shape(
            request, error_response(error.status_code, str(error.detail), param=param, code=None)
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        return in_route_shape(request, exception_response(error))

    app.add_middleware(_LimitBody, max_bytes=state.config.max_body_bytes)
    app.add_middleware(_CountResponses, metrics=state.metrics)  # counts 413s too
    app.add_middleware(_RequestIdHeader)
    if state.config.allowed_origins:
        # (outermost: a browser's preflight is answered before anything else)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.allowed_origins),
            allow_methods=list(state.config.allowed_methods),
            allow_headers=list(state.config.allowed_headers),
            allow_credentials=state.config.allow_credentials,
        )

    # ------------------------------------------------------------------ plain routes

    @app.get("/health", tags=["server"])
    async def health():
        ok, status = state.health()
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        tags=["server"],
        response_class=PlainTextResponse,
        dependencies=[Depends(_check_metrics_key)],
    )
    async def metrics():
        return Response(state.metrics_text(), media_type=prom.CONTENT_TYPE)

    @app.get("/version", tags=["server"])
    async def version():
        return {"version": jaxlora_version}

    @app.post("/reset_prefix_cache", tags=["server"], dependencies=[Depends(_check_api_key)])
    async def reset_prefix_cache():
        """vLLM's: forgets the cached prompt prefixes (--enable_prefix_caching); requests in
        flight keep their pages."""
        _require_admin("reset the prefix cache")
        dropped = await anyio.to_thread.run_sync(state.engine.reset_prefix_cache)
        return {"reset": True, "pages_dropped": dropped}

    async def resolve_model(name: str) -> str | None:
        """``state.resolve_model`` for the request's API key; off the event loop where it may
        load an adapter."""
        if not _caller_may_use(name):
            raise state.unknown_model(name)
        if state.knows_model(name):
            return state.resolve_model(name)
        return await anyio.to_thread.run_sync(lambda: state.resolve_model(name))

    def need_tokenizer(field: str):
        if state.tokenizer is None:
            raise with_param(
                RequestError(f"{field}: the model has no tokenizer; requests take token ids"),
                field,
            )
        return state.tokenizer

    @app.post("/tokenize", tags=["tokenizer"], dependencies=[Depends(_check_api_key)])
    async def tokenize(body: TokenizeRequest):
        """vLLM's /tokenize: the token ids a completion (prompt) or a chat (messages) would
        feed the model."""
        _check_text(body)
        if body.model is not None:
            await resolve_model(body.model)  # 404 for a model that is not served
        if (body.prompt is None) == (body.messages is None):
            raise with_param(
                RequestError("prompt, messages: expected exactly one of them"),
                "prompt" if body.prompt is None else "messages",
            )
        if body.prompt is not None:
            tokenizer = need_tokenizer("prompt")
            prompt = body.prompt
            ids = await anyio.to_thread.run_sync(
                lambda: tokenizer.encode(prompt, add_bos=body.add_special_tokens)
            )
        else:
            need_tokenizer("messages")
            chat = ChatCompletionRequest(
                model=body.model or "",
                messages=body.messages,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs,
                chat_template=body.chat_template,
                **(
                    {"add_generation_prompt": body.add_generation_prompt}
                    if "add_generation_prompt" in body.model_fields_set
                    else {}
                ),
            )
            _refuse_unsupported(chat)
            ids = await anyio.to_thread.run_sync(lambda: _chat_prompt(state, chat))
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize", tags=["tokenizer"], dependencies=[Depends(_check_api_key)])
    async def detokenize(body: DetokenizeRequest):
        """vLLM's /detokenize: the text of token ids (special tokens dropped)."""
        if body.model is not None:
            await resolve_model(body.model)
        tokenizer = need_tokenizer("tokens")
        vocab = state.llm.config.vocab_size

        def decode():
            for i, token in enumerate(body.tokens):
                if not 0 <= token < vocab:
                    raise with_param(
                        RequestError(
                            f"tokens[{i}]: token id {token} is outside the vocabulary "
                            f"(expected 0..{vocab - 1})"
                        ),
                        "tokens",
                    )
            return tokenizer.decode(body.tokens)

        # (off the event loop, as /tokenize: millions of ids take a second)
        return {"prompt": await anyio.to_thread.run_sync(decode)}

    api = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])

    def _card_for_caller(card: dict) -> dict:
        # An adapter's root is where it lies on the server's disk: an admin's business, not a
        # tenant's (a tenant key sees the model's name there).
        caller = _CALLER.get()
        if caller is None or caller.admin:
            return card
        return {**card, "root": card["id"]}

    @api.get("/models", tags=["models"])
    async def list_models():
        cards = [_card_for_caller(card) for card in state.models() if _caller_may_use(card["id"])]
        return {"object": "list", "data": cards}

    @api.get("/models/{model_id:path}", tags=["models"])
    async def get_model(model_id: str):
        await resolve_model(model_id)  # raises the 404 (or loads the adapter on demand)
        for card in state.models():
            if card["id"] == model_id:
                return _card_for_caller(card)
        raise UnknownAdapterError(f"The model `{model_id}` does not exist")

    @api.post("/load_lora_adapter", tags=["adapters"], response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        _require_admin("load adapters")
        _check_text(body)
        # Registration reads the adapter's headers from disk: off the event loop.
        if (body.lora_path is None) == (body.merge is None):
            raise with_param(
                RequestError("lora_path: expected exactly one of lora_path and merge"),
                "lora_path",
            )
        if body.merge is not None:
            merge = [(part.lora_name, part.weight) for part in body.merge]
            await anyio.to_thread.run_sync(
                lambda: state.merge_adapters(body.lora_name, merge, replace=body.load_inplace)
            )
        else:
            try:
                await anyio.to_thread.run_sync(
                    lambda: state.load_adapter(
                        body.lora_name, body.lora_path, replace=body.load_inplace
                    )
                )
            except (AdapterError, FormatError) as e:
                if isinstance(e, UnknownAdapterError) or getattr(e, "param", None) is not None:
                    raise
                # The directory's files do not load (its config, its weights): the message
                # names the file on the server's disk; the answer names the request's field.
                raise with_param(
                    type(e)(f"lora_path {body.lora_path!r}: {e}"), "lora_path"
                ) from None
        verb = "replaced" if body.load_inplace else "added"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb} successfully.")

    @api.post("/unload_lora_adapter", tags=["adapters"], response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        _require_admin("unload adapters")
        _check_text(body)
        # Off the event loop: it waits for the merge lock, which a per-request merge being
        # computed in a worker thread holds for as long as the merge takes.
        await anyio.to_thread.run_sync(state.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ------------------------------------------------------------------ generation helpers

    async def structured_output_of(body, forced=None) -> StructuredOutput | None:
        """The request's constraint, checked and compiled against the vocabulary off the event
        loop (a large schema takes a while; the engine's token masks keep the compiled
        grammar, whose copies the request's choices take), the token masks built the first
        time (the tokenizer's trie)."""
        structured = await anyio.to_thread.run_sync(lambda: _structured_output(body, forced))
        if structured is not None:
            try:
                await anyio.to_thread.run_sync(
                    lambda: state.engine.token_masks(structured.field).prepare(structured)
                )
            except RequestError as e:
                raise with_param(e, structured.field.split(".")[0]) from None
        return structured

    def priority_of(body) -> int:
        """The request's priority: its own, under the priority policy within its API key's
        tier (``ApiKey.priority_of``)."""
        caller = _CALLER.get()
        if caller is None or state.engine.engine_config.scheduling_policy != "priority":
            return body.priority
        return caller.priority_of(body.priority if "priority" in body.model_fields_set else None)

    def submit_group(
        http_id: str,
        prompts: list[list[int]],
        samplings_per_prompt,
        adapter: str | None,
        priority: int = 0,
    ) -> RequestGroup:
        state.refuse_what_never_fits(
            _CALLER.get(),
            [
                len(ids) + sampling.max_tokens
                for ids in prompts
                for sampling in samplings_per_prompt
            ],
        )
        group = RequestGroup(state.engine, state.pump)
        for sampling in samplings_per_prompt:
            try:
                sampling.check_vocab(state.llm.config.vocab_size)
            except RequestError as e:
                # "sampling parameter 'stop_token_ids': ..." or "... 'logit_bias': ..."
                raise with_param(e, str(e).split("'")[1]) from None
        try:
            for p, ids in enumerate(prompts):
                first = None  # the n choices of a prompt compute its pages once
                for c, sampling in enumerate(samplings_per_prompt):
                    request = state.submit(
                        ids,
                        sampling,
                        adapter,
                        f"{http_id}-{p}-{c}",
                        first,
                        priority,
                        caller=_CALLER.get(),
                    )
                    first = first or request
                    group.add(request)
        except BaseException:
            group.cancel()
            raise
        return group

    async def next_event_or_gone(group: RequestGroup, raw: Request, clock: list[float]):
        """The group's next event (None after a quiet poll interval); raises _ClientGone once
        the client disconnected. Checked every poll interval even while tokens keep coming,
        so that a long generation for a vanished client does not run to its end."""
        poll = state.config.disconnect_poll_s
        event = await group.next_event(timeout=poll)
        now = time.monotonic()
        if now - clock[0] >= poll:
            clock[0] = now
            if await raw.is_disconnected():
                raise _ClientGone
        return event

    async def wait_all(group: RequestGroup, raw: Request) -> bool:
        """Waits until every request of group finished; False if the client went away."""
        clock = [time.monotonic()]
        try:
            while not group.finished:
                await next_event_or_gone(group, raw, clock)
        except _ClientGone:
            group.cancel()
            return False
        except BaseException:
            group.cancel()
            raise
        return True

    def check_finished(group: RequestGroup) -> None:
        for request in group.requests:
            error = _failure(state, request)
            if error is not None:
                raise error

    def max_tokens_of(body, default: int) -> int:
        value = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            value = body.max_completion_tokens
        return default if value is None else value

    async def stream(group: RequestGroup, raw: Request, chunks, done: bool = True) -> Response:
        """A text/event-stream of chunks(events) (and ``data: [DONE]`` last where ``done``).
        The first event is awaited before answering, so that a request refused before its
        first token still gets a proper error status."""
        clock = [time.monotonic()]
        try:
            first = None
            while first is None:
                first = await next_event_or_gone(group, raw, clock)
        except _ClientGone:
            group.cancel()
            return Response(status_code=499)
        except BaseException:
            group.cancel()
            raise
        index, delta = first
        if delta.finish_reason is not None and delta.finish_reason not in (
            FinishReason.STOP,
            FinishReason.LENGTH,
        ):
            group.cancel()
            return in_route_shape(raw, exception_response(_failure(state, group.requests[index])))

        async def all_events():
            yield first
            async for event in group.events():
                yield event

        async def body() -> AsyncIterator[str]:
            try:
                async for piece in chunks(all_events()):
                    yield piece
                if done:
                    yield _sse("[DONE]")
            finally:
                group.cancel()  # no-op once every request finished; else the client left

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def stream_error(error: JaxloraError) -> str:
        """An error after the 200 header went out: an SSE event the OpenAI client raises."""
        _, payload = describe(error)
        return _sse(payload)

    # ------------------------------------------------------------------ completions

    @api.post("/completions", tags=["generation"])
    async def completions(body: CompletionRequest, raw: Request):
        _check_text(body)
        adapter = await resolve_model(body.model)
        _refuse_unsupported(body)
        fmt = formatter.of(body)
        # Tokenizing a long prompt takes a while: off the event loop, which serves everyone.
        prompts = await anyio.to_thread.run_sync(
            lambda: _completion_prompts(state, body.prompt, body.n, body.truncate_prompt_tokens)
        )
        structured = await structured_output_of(body)
        # echo with logprobs: the prompt's tokens get theirs too (as OpenAI's legacy API and
        # vLLM answer; lm-evaluation-harness scores choices this way).
        echoed_logprobs = body.logprobs if body.echo else None
        # echo with max_tokens 0: the prompt alone, and its logprobs (OpenAI's legacy way of
        # scoring a text, as vLLM answers it: one token is generated, and not returned).
        echo_only = body.echo and body.max_tokens == 0
        defaults = dict(state.config.sampling_defaults)
        samplings = _samplings(
            body,
            1
            if echo_only
            else max_tokens_of(body, defaults.get("max_tokens", state.config.default_max_tokens)),
            body.logprobs,
            body.n,
            state.config.max_stop_strings,
            prompt_logprobs=_most(echoed_logprobs, body.prompt_logprobs),
            structured_output=structured,
            defaults=defaults,
            max_logprobs=state.config.max_logprobs,
        )
        http_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        group = submit_group(http_id, prompts, samplings, adapter, priority_of(body))
        prompt_lengths = [len(p) for p in prompts]

        def echo_text(index: int) -> str:
            if not body.echo:
                return ""
            if body.truncate_prompt_tokens is not None:  # the prompt the model saw
                tokenizer = state.tokenizer
                return tokenizer.decode(prompts[index // body.n]) if tokenizer is not None else ""
            if isinstance(body.prompt, str):
                return body.prompt
            if isinstance(body.prompt, list) and isinstance(body.prompt[index // body.n], str):
                return body.prompt[index // body.n]
            # Token ids (checked against the vocabulary by the engine by now).
            tokenizer = state.tokenizer
            return tokenizer.decode(prompts[index // body.n]) if tokenizer is not None else ""

        if not body.stream:
            if not await wait_all(group, raw):
                return Response(status_code=499)
            check_finished(group)
            choices = []
            for i, r in enumerate(group.requests):
                logprobs = None
                if body.logprobs is not None:
                    tokens, lps = r.output_ids, r.output_logprobs
                    tops = r.output_top_logprobs or [{}] * len(tokens)  # logprobs=0: none
                    if echo_only:
                        tokens, lps, tops = [], [], []
                    if body.echo:
                        tokens = r.prompt_ids + tokens
                        lps = r.prompt_logprobs + lps
                        tops = _first(r.prompt_top_logprobs, body.logprobs) + tops
                    logprobs, _ = fmt.completion_logprobs(tokens, lps, tops, 0)
                choice = {
                    "index": i,
                    "text": echo_text(i) + ("" if echo_only else r.text),
                    "logprobs": logprobs,
                    "finish_reason": str(r.finish_reason),
                    "stop_reason": r.stop_reason,
                }
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = formatter.prompt_logprobs(r, body.prompt_logprobs)
                if body.return_token_ids:
                    choice["prompt_token_ids"] = list(r.prompt_ids)
                    choice["token_ids"] = list(r.output_ids)
                choices.append(choice)
            return {
                "id": http_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": choices,
                "usage": _usage(
                    prompt_lengths,
                    group.requests,
                    whole=True,
                    cached=state.config.enable_prompt_tokens_details,
                ),
                **_ANSWER_NULLS,
            }

        include_usage = _usage_options(body)[0]
        streamed = [0] * len(group.requests)  # each choice's output tokens sent so far
        chunk = _chunk_writer(
            body,
            http_id,
            created,
            "text_completion",
            lambda i: _usage(
                [prompt_lengths[i // body.n]], [group.requests[i]], sent=[streamed[i]]
            ),
        )

        async def chunks(events) -> AsyncIterator[str]:
            offsets = [0] * len(group.requests)
            echoed, ids_sent = set(), set()
            async for index, delta in events:
                delta: Delta
                streamed[index] += len(delta.token_ids)
                if delta.finish_reason is not None and delta.finish_reason not in (
                    FinishReason.STOP,
                    FinishReason.LENGTH,
                ):
                    yield stream_error(_failure(state, group.requests[index]))
                    return
                text = "" if echo_only else delta.text
                if body.echo and index not in echoed:
                    echoed.add(index)
                    text = echo_text(index) + text
                logprobs = None
                if body.logprobs is not None and delta.token_ids:
                    tokens, lps = delta.token_ids, delta.logprobs
                    tops = delta.top_logprobs or [{}] * len(tokens)  # logprobs=0: none
                    if echo_only:
                        tokens, lps, tops = [], [], []
                    if body.echo and delta.prompt_logprobs is not None:  # the first delta
                        tokens = group.requests[index].prompt_ids + tokens
                        lps = delta.prompt_logprobs + lps
                        tops = _first(delta.prompt_top_logprobs, body.logprobs) + tops
                    logprobs, offsets[index] = fmt.completion_logprobs(
                        tokens, lps, tops, offsets[index]
                    )
                finish = None if delta.finish_reason is None else str(delta.finish_reason)
                r = group.requests[index]
                # (a model without a tokenizer streams no text: its tokens are the news)
                new_ids = bool(body.return_token_ids and delta.token_ids)
                if text or logprobs or finish or new_ids:
                    choice = {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                        "stop_reason": None if finish is None else r.stop_reason,
                    }
                    if body.prompt_logprobs is not None and delta.prompt_logprobs is not None:
                        # (with the first delta, once every prompt token's are recorded)
                        choice["prompt_logprobs"] = formatter.prompt_logprobs(
                            group.requests[index], body.prompt_logprobs
                        )
                    if body.return_token_ids:
                        if index not in ids_sent:
                            ids_sent.add(index)
                            choice["prompt_token_ids"] = list(group.requests[index].prompt_ids)
                        choice["token_ids"] = list(delta.token_ids)
                    yield chunk([choice])
            if include_usage:
                yield chunk(
                    [],
                    _usage(
                        prompt_lengths,
                        group.requests,
                        cached=state.config.enable_prompt_tokens_details,
                    ),
                )

        return await stream(group, raw, chunks)

    # ------------------------------------------------------------------ chat

    async def start_chat(body: ChatCompletionRequest, http_id: str) -> _ChatRun:
        """Checks a chat request, renders its prompt and submits its choices."""
        _check_text(body)
        adapter = await resolve_model(body.model)
        _refuse_unsupported(body)
        if state.tokenizer is None:
            raise with_param(
                RequestError(
                    "messages: the model has no tokenizer (and so no chat "
                    "template); use /v1/completions with token ids"
                ),
                "messages",
            )
        if not 1 <= body.n <= state.config.max_n:
            raise with_param(
                RequestError(f"n: expected 1..{state.config.max_n}, got {body.n}"), "n"
            )
        # Tool calls are read back from the answers where the request offers tools and lets
        # the model call them (tool_choice "auto" or none given); a forced call is decoded
        # under its schema.
        parser, forced = None, forced_tool_calls(body)
        structured = await structured_output_of(body, forced)
        if body.tools and body.tool_choice in (None, "auto"):
            if not state.config.auto_tool_choice:
                raise with_param(
                    RequestError(
                        "tool_choice: 'auto' (the default where tools are given) needs a server "
                        "started with --enable_auto_tool_choice; send 'none', 'required' or a "
                        "named function"
                    ),
                    "tool_choice",
                )
            parser = state.config.tool_call_parser
            if parser is None:
                raise with_param(
                    RequestError(
                        "tools: this server reads no tool calls back (start it with "
                        "--tool_call_parser=hermes, llama3_json, mistral or pythonic), or send "
                        "tool_choice='none'"
                    ),
                    "tools",
                )
        if parser in KEEPS_SPECIAL_TOKENS and body.skip_special_tokens:
            # (the calls' marker is a special token)
            body = body.model_copy(update={"skip_special_tokens": False})
        prompt = await anyio.to_thread.run_sync(lambda: _chat_prompt(state, body))
        # The server's reasoning parser, and this answer's reading: none where the prompt has
        # closed the reasoning (the whole answer is content).
        parser_format = REASONING_PARSERS.get(state.config.reasoning_parser or "")
        reasoning_format, tags = parser_format, None
        if parser_format is not None:
            tags = grammar_start(parser_format, state.tokenizer)
            if prompt_closes_reasoning(parser_format, tags, state.tokenizer, prompt):
                reasoning_format, tags = None, None
            elif not parser_format.opened_by_prompt and prompt_opens_reasoning(
                parser_format, tags, state.tokenizer, prompt
            ):
                reasoning_format = dataclasses.replace(parser_format, opened_by_prompt=True)
                tags = grammar_start(reasoning_format, state.tokenizer)
        rest_of_context = max(1, state.max_model_len - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        defaults = dict(state.config.sampling_defaults)
        samplings = _samplings(
            body,
            max_tokens_of(body, min(rest_of_context, defaults.get("max_tokens", rest_of_context))),
            logprobs,
            body.n,
            state.config.max_stop_strings,
            prompt_logprobs=body.prompt_logprobs,
            structured_output=structured,
            reasoning_tokens=tags if structured is not None else None,
            defaults=defaults,
            max_logprobs=state.config.max_logprobs,
        )
        group = submit_group(http_id, [prompt], samplings, adapter, priority_of(body))
        return _ChatRun(
            body=body,
            group=group,
            prompt=prompt,
            parser_format=parser_format,
            reasoning_format=reasoning_format,
            forced=forced,
            parser=parser,
            echo=_chat_echo(body),
            reasoning_tags=tags,
            tokenizer=state.tokenizer,
        )

    def chat_answers(run: _ChatRun) -> list[tuple[dict, str]]:
        """Each choice's message and finish reason, once every choice finished."""
        body, answers = run.body, []
        role = _answer_role(body, state.config.response_role)
        for r in run.group.requests:
            text, reasoning = r.text, None
            if run.reasoning_format is not None:
                reasoning, text = split_reasoning(r.text, run.reasoning_format)
            message, finish = chat_message(
                text or "", str(r.finish_reason), run.calls_reader, run.max_calls
            )
            message["role"] = role
            if run.echo:
                message["content"] = run.echo + (message.get("content") or "")
            elif text is None and message["content"] == "":
                message["content"] = None  # (all reasoning, as vLLM answers)
            if run.parser_format is not None and body.include_reasoning:
                # (vLLM's name, and its older one, which clients written for it still read)
                message["reasoning"] = message["reasoning_content"] = reasoning
            answers.append((message, finish))
        return answers

    async def chat_pieces(run: _ChatRun, events) -> AsyncIterator[tuple[str, int, object, object]]:
        """A streamed chat's pieces as they come, (kind, choice, value, logprobs): "reasoning"
        and "content" text, "tool_calls" (OpenAI tool-call deltas, as a forced call streams or
        as the calls read at the end), "finish" (the finish reason) and "error" (an exception,
        the last piece)."""
        body, requests = run.body, run.group.requests
        fmt = formatter.of(body)
        calls = [
            (forced_tool_calls(body) if run.forced else ToolCallStream(run.parser))
            if run.calls_reader
            else None
            for _ in requests
        ]
        thinking = [
            ReasoningStream(run.reasoning_format) if run.reasoning_format is not None else None
            for _ in requests
        ]
        async for index, delta in events:
            if delta.finish_reason is not None and delta.finish_reason not in (
                FinishReason.STOP,
                FinishReason.LENGTH,
            ):
                yield "error", index, _failure(state, requests[index]), None
                return
            lp = None
            if body.logprobs and delta.token_ids:
                lp = fmt.chat_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
            text, stream_calls = delta.text, calls[index]
            if thinking[index] is not None:
                reasoning, text = thinking[index].push(text)
                if delta.finish_reason is not None:
                    tail = thinking[index].finish()
                    reasoning, text = reasoning + tail[0], text + tail[1]
                if reasoning and body.include_reasoning:
                    yield "reasoning", index, reasoning, lp
                    lp = None
            if stream_calls is not None:
                text = stream_calls.push(text)
                streamed = stream_calls.call_deltas()
                if streamed:
                    yield "tool_calls", index, streamed, lp
                    lp = None
            if text or lp:
                yield "content", index, text, lp
            if delta.finish_reason is not None:
                finish = str(delta.finish_reason)
                if stream_calls is not None:
                    held, found = stream_calls.finish()
                    found = found[: run.max_calls]
                    if held:
                        yield "content", index, held, None
                    if found:
                        finish = run.forced.finish_reason if run.forced else "tool_calls"
                        found_deltas = [c.to_openai(k) for k, c in enumerate(found)]
                        yield "tool_calls", index, found_deltas, None
                yield "finish", index, finish, None

    @api.post("/chat/completions", tags=["generation"])
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        http_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        run = await start_chat(body, http_id)
        group, prompt, fmt = run.group, run.prompt, formatter.of(body)

        if not body.stream:
            if not await wait_all(group, raw):
                return Response(status_code=499)
            check_finished(group)
            choices = []
            for i, ((message, finish), r) in enumerate(
                zip(chat_answers(run), group.requests, strict=True)
            ):
                lp = None
                if body.logprobs:
                    lp = fmt.chat_logprobs(r.output_ids, r.output_logprobs, r.output_top_logprobs)
                choice = {
                    "index": i,
                    "message": message,
                    "logprobs": lp,
                    "finish_reason": finish,
                    "stop_reason": r.stop_reason,
                }
                if body.return_token_ids:
                    choice["token_ids"] = list(r.output_ids)
                choices.append(choice)
            answer = {
                "id": http_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": choices,
                "usage": _usage(
                    [len(prompt)],
                    group.requests,
                    run.reasoning_counter,
                    whole=True,
                    cached=state.config.enable_prompt_tokens_details,
                ),
                **_ANSWER_NULLS,
            }
            if body.return_token_ids:  # (vLLM's: one list, the choices share the prompt)
                answer["prompt_token_ids"] = list(prompt)
            if body.prompt_logprobs is not None:  # (vLLM's: one list, the choices share it)
                answer["prompt_logprobs"] = formatter.prompt_logprobs(
                    group.requests[0], body.prompt_logprobs
                )
            return answer

        include_usage = _usage_options(body)[0]
        streamed = [0] * len(group.requests)  # each choice's output tokens read so far
        chunk = _chunk_writer(
            body,
            http_id,
            created,
            "chat.completion.chunk",
            lambda i: _usage(
                [len(prompt)], [group.requests[i]], run.reasoning_counter, sent=[streamed[i]]
            ),
        )

        # return_token_ids: each choice's output tokens go out with its next chunk (the finish
        # chunk at the latest; text a parser holds back does not hold back its tokens' ids).
        unsent_ids: list[list[int]] = [[] for _ in group.requests]

        def delta_chunk(index: int, delta: dict, logprobs=None, finish_reason=None, **fields):
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            if finish_reason is not None:  # (vLLM's, with the finish only)
                choice["stop_reason"] = group.requests[index].stop_reason
            if body.return_token_ids:
                choice["token_ids"], unsent_ids[index] = unsent_ids[index], []
            return chunk([choice], **fields)

        async def noting_token_ids(events):
            async for index, delta in events:
                unsent_ids[index].extend(delta.token_ids)
                streamed[index] += len(delta.token_ids)
                yield index, delta

        # (reasoning under vLLM's name, and its older one, as the whole message has it)
        delta_keys = {
            "reasoning": ("reasoning", "reasoning_content"),
            "content": ("content",),
            "tool_calls": ("tool_calls",),
        }

        async def chunks(events) -> AsyncIterator[str]:
            role = _answer_role(body, state.config.response_role)
            for i in range(len(group.requests)):
                # (vLLM's: the prompt's token ids with the first chunk)
                first = (
                    {"prompt_token_ids": list(prompt)} if body.return_token_ids and not i else {}
                )
                yield delta_chunk(i, {"role": role, "content": ""}, **first)
                if run.echo:
                    yield delta_chunk(i, {"content": run.echo})
            async for kind, index, value, lp in chat_pieces(run, noting_token_ids(events)):
                if kind == "error":
                    yield stream_error(value)
                    return
                if kind == "finish":
                    yield delta_chunk(index, {}, finish_reason=value)
                else:
                    yield delta_chunk(index, dict.fromkeys(delta_keys[kind], value), lp)
            if include_usage:
                yield chunk(
                    [],
                    _usage(
                        [len(prompt)],
                        group.requests,
                        run.reasoning_counter,
                        cached=state.config.enable_prompt_tokens_details,
                    ),
                )

        return await stream(group, raw, chunks)

    # ------------------------------------------------------------------ responses

    @api.post("/responses", tags=["generation"])
    async def create_response(body: ResponsesRequest, raw: Request):
        _check_text(body)
        # The model's sampling defaults fill what the request leaves unset, here already, so
        # that the response object reports the temperature and top_p its answer used.
        defaults = dict(state.config.sampling_defaults)
        unset = {k: defaults[k] for k in ("temperature", "top_p") if k in defaults}
        unset = {k: v for k, v in unset.items() if getattr(body, k) is None}
        if unset:
            body = body.model_copy(update=unset)
        history = []
        owner = _caller_name()
        if body.previous_response_id is not None:
            stored = callers_response(body.previous_response_id)
            if stored is None:
                raise with_param(
                    NotFoundError(
                        f"previous_response_id: no stored response {body.previous_response_id!r}"
                    ),
                    "previous_response_id",
                )
            history = stored.conversation
        response_id = f"resp_{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            chat, conversation = responses.chat_body(body, history)
            run = await start_chat(chat, response_id)
        except JaxloraError as e:
            raise responses.renamed(e) from None
        request = run.group.requests[0]

        def usage(thought: int) -> dict:
            return responses.usage(
                len(run.prompt), len(request.output_ids), thought, request.num_cached_tokens
            )

        def kept(response: dict) -> dict:
            if body.store:
                message = responses.assistant_message(response["output"])
                state.responses.put(
                    responses.StoredResponse(
                        response,
                        [*conversation, message],
                        responses.input_items(body.input),
                        owner,
                    )
                )
            return response

        if not body.stream:
            if not await wait_all(run.group, raw):
                return Response(status_code=499)
            check_finished(run.group)
            [(message, finish)] = chat_answers(run)
            thought = run.reasoning_tokens(request.output_ids)
            logprobs = None
            if responses.wants_logprobs(body):  # (the text's tokens: those after the reasoning)
                entries = formatter.of(chat).chat_logprobs(
                    request.output_ids, request.output_logprobs, request.output_top_logprobs
                )["content"]
                logprobs = entries[thought:]
            return kept(
                responses.response_object(
                    body,
                    response_id,
                    created,
                    responses.status_of(finish),
                    responses.output_items(message, finish, logprobs),
                    usage(thought),
                )
            )

        writer = responses.ResponseEvents(body, response_id, created)
        handlers = {"reasoning": writer.reasoning, "tool_calls": writer.call_deltas}

        async def events_of(events) -> AsyncIterator[str]:
            for event in writer.start():
                yield event
            async for kind, _, value, lp in chat_pieces(run, events):
                if kind == "error":
                    for event in writer.error(describe(value)[1]):
                        yield event
                    return
                if kind == "content":
                    for event in writer.content(value, lp and lp["content"]):
                        yield event
                    continue
                if kind == "finish":
                    thought = run.reasoning_tokens(request.output_ids)
                    closing, response = writer.finish(value, usage(thought))
                    kept(response)
                    for event in closing:
                        yield event
                else:
                    for event in handlers[kind](value):
                        yield event

        return await stream(run.group, raw, events_of, done=False)

    def callers_response(response_id: str) -> responses.StoredResponse | None:
        """A stored response of the request's API key (another key's: as if there were none)."""
        stored = state.responses.get(response_id)
        return stored if stored is not None and stored.owner == _caller_name() else None

    def stored_response(response_id: str) -> responses.StoredResponse:
        stored = callers_response(response_id)
        if stored is None:
            raise NotFoundError(f"No response found with id '{response_id}'")
        return stored

    @api.get("/responses/{response_id}", tags=["generation"])
    async def get_response(response_id: str):
        return stored_response(response_id).response

    @api.get("/responses/{response_id}/input_items", tags=["generation"])
    async def list_input_items(
        response_id: str, limit: int = 20, order: str = "desc", after: str | None = None
    ):
        items = stored_response(response_id).input_items
        if not 1 <= limit <= 100:
            raise with_param(RequestError(f"limit: expected 1..100, got {limit}"), "limit")
        if order not in ("asc", "desc"):
            raise with_param(
                RequestError(f"order: expected 'asc' or 'desc', got {order!r}"), "order"
            )
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise with_param(RequestError(f"after: no input item {after!r}"), "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    @api.delete("/responses/{response_id}", tags=["generation"])
    async def delete_response(response_id: str):
        stored_response(response_id)  # (404 unless it is the caller's)
        if not state.responses.delete(response_id):
            raise NotFoundError(f"No response found with id '{response_id}'")
        return {"id": response_id, "object": "response", "deleted": True}

    @api.post("/responses/{response_id}/cancel", tags=["generation"])
    async def cancel_response(response_id: str):
        """OpenAI cancels background responses only (a stored one is already done): 404 for
        an unknown id, else 400, as OpenAI answers for a response that was not background."""
        stored_response(response_id)  # (404 unless it is the caller's)
        raise with_param(
            RequestError(
                "response_id: only background responses can be cancelled; this server runs "
                "none (background is not supported)"
            ),
            "response_id",
        )

    app.include_router(api)

    # SageMaker's container contract (as vLLM's): GET /ping answers as /health, and POST
    # /invocations takes any generation body, routed by its shape.
    @app.get("/ping", tags=["server"])
    @app.post("/ping", tags=["server"])
    async def ping():
        return await health()

    invocation_routes = (
        ("messages", ChatCompletionRequest, chat_completions),
        ("prompt", CompletionRequest, completions),
        ("input", ResponsesRequest, create_response),
    )

    @app.post("/invocations", tags=["generation"], dependencies=[Depends(_check_api_key)])
    async def invocations(raw: Request):
        """A chat (a body with ``messages``), a completion (``prompt``) or a response
        (``input``), answered as its /v1 route answers it."""
        try:
            body = json.loads(await raw.body())
        except ClientDisconnect:  # (gone before its body arrived: nobody to answer)
            return Response(status_code=499)
        except json.JSONDecodeError as e:
            problem = {"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON"}
            raise RequestValidationError([{**problem, "ctx": {"error": str(e)}}]) from None
        except (ValueError, RecursionError) as e:
            # Not UTF-8, nested too deeply, an int of over 4300 digits: answered as FastAPI's
            # parsing of the other routes' bodies is (``http_error``).
            raise with_param(
                RequestError(f"body: not valid JSON ({type(e).__name__}: {e})"), "body"
            ) from None
        route = next(
            (r for r in invocation_routes if isinstance(body, dict) and r[0] in body), None
        )
        if route is None:
            raise with_param(
                RequestError(
                    "body: expected a chat (with messages), a completion (with prompt) or a "
                    "response (with input)"
                ),
                "body",
            )
        _, model, handler = route
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors(), body=body) from None
        return await handler(parsed, raw)

    # ------------------------------------------------------------------ LoRAX / TGI

    # (the tokenizer's special ids, listed once, not at every request)
    lorax_writer = lorax.TokenWriter(state.tokenizer)

    async def lorax_run(body: lorax.GenerateRequest, want_logprobs: bool):
        """Checks and submits a LoRAX request: (its group, the prompt's token ids)."""
        held = None  # a per-request merge, held until the request is in the engine's queue
        try:
            merge = lorax.merge_spec(body.parameters)  # (checked before the other fields)
            completion = lorax.completion_body(
                body, state.config.model_name, state.config.adapter_roots
            )
            _check_text(completion)
            if merge is None:
                adapter = await resolve_model(completion.model)
            else:
                parts = await lorax_merge_parts(merge)
            _refuse_unsupported(completion)
            prompts = await anyio.to_thread.run_sync(
                lambda: _completion_prompts(
                    state, completion.prompt, 1, completion.truncate_prompt_tokens
                )
            )
            structured = await structured_output_of(completion)
            k = lorax.alternatives_of(body.parameters)
            defaults = dict(state.config.sampling_defaults)
            samplings = _samplings(
                completion,
                max_tokens_of(
                    completion, defaults.get("max_tokens", state.config.default_max_tokens)
                ),
                k or (0 if want_logprobs else None),
                1,
                state.config.max_stop_strings,
                prompt_logprobs=0 if body.parameters.decoder_input_details else None,
                structured_output=structured,
                defaults=defaults,
                max_logprobs=state.config.max_logprobs,
            )
            if merge is not None:
                # The merge is work (and a place among --max_request_merges): the request's
                # own checks and its key's limits refuse it first.
                state.check_limits(_CALLER.get(), len(prompts[0]) + samplings[0].max_tokens)
                adapter = held = await lorax_merged_adapter(merge, parts)
            group = submit_group(
                f"generate-{uuid.uuid4().hex}", prompts, samplings, adapter, priority_of(completion)
            )
        except JaxloraError as e:
            raise lorax.renamed(e, body) from None
        finally:
            if held is not None:
                state.release_merge(held)
        return group, prompts[0]

    async def lorax_merge_parts(merge: lorax.MergeSpec) -> list[tuple[str, float]]:
        """The adapters and weights of a request's merged_adapters (each part one the caller
        may use)."""
        parts = []
        for i, (part, weight) in enumerate(zip(merge.ids, merge.weights, strict=True)):
            field = f"parameters.merged_adapters.ids[{i}]"
            name = lorax.local_adapter_name(part, state.config.adapter_roots)
            try:
                adapter = await resolve_model(name)
            except JaxloraError as e:
                raise with_param(type(e)(f"{field}: {e}"), field) from None
            if adapter is None:
                raise with_param(
                    RequestError(f"{field}: {part!r} is the base model, not an adapter"), field
                )
            parts.append((adapter, weight))
        return parts

    async def lorax_merged_adapter(merge: lorax.MergeSpec, parts) -> str:
        """The adapter of a request's merged_adapters (lorax_merge_parts' parts), held."""
        return await anyio.to_thread.run_sync(
            lambda: state.request_merge(
                parts,
                strategy=merge.strategy,
                density=merge.density,
                majority_sign_method=merge.majority_sign_method,
            )
        )

    def lorax_full_text(body: lorax.GenerateRequest, text: str) -> str:
        return body.inputs + text if body.parameters.return_full_text else text

    @app.post("/generate", tags=["lorax"], dependencies=[Depends(_check_api_key)])
    async def lorax_generate(body: lorax.GenerateRequest, raw: Request):
        """LoRAX's (and TGI's) generate: ``generated_text`` and, with ``details``, the finish
        reason, token counts and each token (jaxlora.server.lorax)."""
        if body.stream and raw.url.path.endswith("/generate"):
            raise with_param(
                RequestError(
                    "stream: POST /generate answers once; stream with POST /generate_stream "
                    "(or POST / with stream true)"
                ),
                "stream",
            )
        details = body.parameters.details
        group, prompt = await lorax_run(body, want_logprobs=details)
        alternatives = body.parameters.return_k_alternatives or None  # (LoRAX's)
        top_n = body.parameters.top_n_tokens or None  # (TGI's)
        if not await wait_all(group, raw):
            return Response(status_code=499)
        check_finished(group)
        r = group.requests[0]
        answer = {"generated_text": lorax_full_text(body, r.text), "details": None}
        if details:
            answer["details"] = {
                **lorax.details_of(r, len(prompt), state.engine.eos_ids),
                "skipped_tokens": 0,
                "prefill": (
                    lorax_writer.prefill(r.prompt_ids, r.prompt_logprobs)
                    if body.parameters.decoder_input_details
                    else []
                ),
                "tokens": lorax_writer.tokens(
                    r.output_ids, r.output_logprobs, r.output_top_logprobs, alternatives
                ),
                "best_of_sequences": None,
            }
            if top_n:  # (TGI's form of the same: a list of entries a step)
                answer["details"]["top_tokens"] = [
                    lorax_writer.top_tokens(top, top_n) for top in r.output_top_logprobs
                ]
        return answer

    @app.post("/generate_stream", tags=["lorax"], dependencies=[Depends(_check_api_key)])
    async def lorax_generate_stream(body: lorax.GenerateRequest, raw: Request):
        """LoRAX's (and TGI's) generate_stream: one server-sent event a generated token
        (``token``: id, text, logprob, special), the last one with ``generated_text`` and
        ``details`` (finish reason, token counts, seed). No ``[DONE]`` event, as LoRAX's. A
        token's event goes out as the engine reports it; the last token's (``Delta.last``)
        waits for the finish, reported in the same engine iteration, to carry the details."""
        group, prompt = await lorax_run(body, want_logprobs=True)
        alternatives = body.parameters.return_k_alternatives or None  # (LoRAX's)
        top_n = body.parameters.top_n_tokens or None  # (TGI's)
        request = group.requests[0]

        async def chunks(events) -> AsyncIterator[str]:
            # The last token's event waits for the finish (a delta of its own), as LoRAX's last
            # event is a token's, with the details; every other token's goes out at once.
            pending = None
            async for _, delta in events:
                delta: Delta
                if delta.finish_reason is not None and delta.finish_reason not in (
                    FinishReason.STOP,
                    FinishReason.LENGTH,
                ):
                    if pending is not None:
                        yield _sse(pending)
                    # TGI's error event: {"error", "error_type"} (lorax-client raises it).
                    yield _sse(tgi_error(*describe(_failure(state, request)))[1])
                    return
                ids = delta.token_ids
                # The delta's text goes with its last token that is not special (a special
                # token's text is its own, which clients leave out by its flag).
                plain = [i for i, t in enumerate(ids) if t not in lorax_writer.special]
                carrier = plain[-1] if plain else None
                tops = delta.top_logprobs or [None] * len(ids)
                logprobs = delta.logprobs or [None] * len(ids)
                for i, token_id in enumerate(ids):
                    if token_id in lorax_writer.special:
                        text = lorax_writer.text(token_id)
                    else:
                        text = delta.text if i == carrier else ""
                    if pending is not None:
                        yield _sse(pending)
                    pending = {
                        "token": lorax_writer.token(
                            token_id, text, logprobs[i], tops[i], alternatives
                        ),
                        "generated_text": None,
                        "details": None,
                    }
                    if top_n:
                        pending["top_tokens"] = lorax_writer.top_tokens(tops[i], top_n)
                if pending is not None and ids and not delta.last:
                    yield _sse(pending)
                    pending = None
                if delta.finish_reason is not None and pending is not None:
                    pending["generated_text"] = lorax_full_text(body, request.text)
                    pending["details"] = {
                        **lorax.details_of(request, len(prompt), state.engine.eos_ids),
                        "input_length": len(prompt),  # (TGI's name)
                    }
                    yield _sse(pending)
                    return
            if pending is not None:
                yield _sse(pending)

        return await stream(group, raw, chunks, done=False)

    @app.get("/info", tags=["lorax"])
    async def lorax_info():
        """TGI's and LoRAX's /info: what is served and its limits (the model's name and dtype,
        the context, the batch and queue bounds, stop sequences, best_of). Open, as /health
        and /version are, and naming no adapter (GET /v1/models lists a key's own)."""
        engine = state.engine
        leaf = jax.tree.leaves(engine.runner.params)[0]
        return {
            "model_id": state.config.model_name,
            "model_sha": None,
            "model_dtype": jnp.dtype(leaf.dtype).name,
            "model_device_type": jax.default_backend(),
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": engine.engine_config.max_waiting,
            "max_best_of": 1,
            "max_stop_sequences": state.config.max_stop_strings,
            "max_input_length": state.max_model_len - 1,
            "max_total_tokens": state.max_model_len,
            "max_batch_size": engine.engine_config.runner.max_batch,
            "max_batch_total_tokens": engine.engine_config.max_num_tokens,
            "router": "jaxlora",
            "version": jaxlora_version,
            "sha": None,
            "docker_label": None,
        }

    @app.post("/", tags=["lorax"], dependencies=[Depends(_check_api_key)])
    async def lorax_root(body: lorax.GenerateRequest, raw: Request):
        """TGI's compatibility route, which lorax-client posts to: generate_stream where
        ``stream`` is true, else generate's answer in a list of one (as TGI's)."""
        if body.stream:
            return await lorax_generate_stream(body, raw)
        answer = await lorax_generate(body, raw)
        return [answer] if isinstance(answer, dict) else answer

    return app


class _ClientGone(Exception):
    """The client of a request disconnected."""


def _in_route_shape(path: str, method: str, response: JSONResponse) -> JSONResponse:
    """The error answer as the route's API shapes errors: LoRAX's (and TGI's) routes in TGI's
    shape and statuses (``tgi_error``), every other route in OpenAI's."""
    if path not in lorax.ROUTES or (path == "/" and method != "POST"):
        return response
    status, payload = tgi_error(response.status_code, json.loads(response.body))
    wait = response.headers.get("retry-after")
    headers = {"Retry-After": wait} if wait is not None else None
    return ErrorJSONResponse(payload, status_code=status, headers=headers)


class _LimitBody:
    """Refuses request bodies over max_bytes (413) before reading them: by their Content-Length,
    or, sent in chunks, as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self, size: str) -> str:
        return f"body: {size}; the server accepts at most {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, self.message(f"{length} bytes"), param="body")
            # (answered before the app's error handlers, which shape the other refusals)
            response = _in_route_shape(scope["path"], scope["method"], response)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside FastAPI's reading of the body, which passes it on to
                    # the app's handler of HTTP errors.
                    raise StarletteHTTPException(413, self.message(f"over {received} bytes"))
            return message

        await self.app(scope, limited_receive, send)


class _CountResponses:
    """Counts responses per route and status (plain ASGI: streaming passes through untouched)."""

    def __init__(self, app, metrics: prom.ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/v1/models/"):
            route = "/v1/models/{model}"
        elif path.startswith("/v1/responses/"):
            route = "/v1/responses/{id}"
        else:
            route = path if path in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.inc(route, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class _RequestIdHeader:
    """Every answer carries ``X-Request-Id``: the client's own (as a gateway sends it), or a
    new one, so that a request can be followed through proxies and logs (vLLM's
    ``--enable-request-id-headers``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        # (echoed only when it is a plain ASCII token: no header injection through it, and no
        # latin-1 letter, which str's \w matches, going back re-encoded as other bytes)
        request_id = (
            given if re.fullmatch(r"[\w.:@-]{1,128}", given, re.ASCII) else uuid.uuid4().hex
        )

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged_send)


# Names pydantic gives the members of a union type in an error's location, and how a message
# says them.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|(list|dict|tuple)\[.*\])$")
_UNION_MEMBER_WORDS = {
    "str": "a string",
    "list[str]": "a list of strings",
    "list[int]": "a list of token ids",
    "list[list[int]]": "a list of token-id lists",
    "list[dict[str,any]]": "a list of content parts",
    "dict[str,any]": "an object",
}


def _is_union_member(part) -> bool:
    return isinstance(part, str) and bool(_UNION_MEMBER.match(part))


def _field_name(loc: tuple) -> str:
    """A location in a body as messages name it: messages[0].content."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or "body"


def _loc_in_body(problem: dict) -> tuple:
    loc = tuple(problem.get("loc", ()))
    return loc[1:] if loc[:1] == ("body",) else loc


def _shown(body, loc: tuple) -> str:
    """The JSON value at loc of a request body, cut short."""
    value = body
    try:
        for part in loc:
            value = value[part]
        text = json.dumps(value)
    except (KeyError, IndexError, TypeError, ValueError):
        return "something else"
    return text if len(text) <= 60 else text[:57] + "..."


def _kept_tokens(state: ServingState, truncate: int | None) -> int | None:
    """How many of a prompt's last tokens ``truncate_prompt_tokens`` keeps (None: all)."""
    if truncate is None:
        return None
    return state.max_model_len if truncate == -1 else truncate


def _completion_prompts(
    state: ServingState, prompt, n: int, truncate: int | None = None
) -> list[list[int]]:
    """Token ids of each prompt of a completion request (of n choices each), each cut to its
    last ``truncate`` tokens when given (vLLM's ``truncate_prompt_tokens``)."""
    keep = _kept_tokens(state, truncate)
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise with_param(
            RequestError("prompt: expected at least one prompt, got an empty list"), "prompt"
        )
    if n < 1 or n * len(items) > state.config.max_n:
        raise with_param(
            RequestError(
                f"n: expected 1..{state.config.max_n} choices in all (n times the number of "
                f"prompts), got n={n} for {len(items)} prompts"
            ),
            "n",
        )
    ids = []
    for item in items:
        if isinstance(item, str):
            if state.tokenizer is None:
                raise with_param(
                    RequestError(
                        "prompt: text given but the model has no tokenizer; send token ids"
                    ),
                    "prompt",
                )
            if keep is None:
                state.refuse_text_that_cannot_fit(item, "prompt", "characters")
            encoded = state.tokenizer.encode(item)
            ids.append(encoded[-keep:] if keep else encoded)
        else:
            if not item:
                raise with_param(
                    RequestError("prompt: expected at least one token, got an empty token list"),
                    "prompt",
                )
            if keep is not None:
                item = item[-keep:]
            try:  # the engine's check, before copying the ids
                check_prompt_length(len(item), state.max_model_len)
            except RequestError as e:
                raise with_param(e, "prompt") from None
            ids.append([int(t) for t in item])
    return ids


# The fields of a chat request that its rendering may refuse.
_CHAT_FIELDS = (
    "tools",
    "messages",
    "continue_final_message",
    "chat_template_kwargs",
    "chat_template",
)


def _template_kwargs(body) -> dict | None:
    """The chat template's extra variables: chat_template_kwargs, and reasoning_effort."""
    effort = getattr(body, "reasoning_effort", None)
    if effort is None:
        return body.chat_template_kwargs
    return {**(body.chat_template_kwargs or {}), "reasoning_effort": effort}


def _chat_prompt(state: ServingState, body: ChatCompletionRequest) -> list[int]:
    """Token ids of a chat request's messages, rendered with the chat template (the last
    ``truncate_prompt_tokens`` of them when given)."""
    texts = []
    for i, message in enumerate(body.messages):
        content = message.content
        if content is None and message.role != "assistant":
            raise with_param(
                RequestError(
                    f"messages[{i}].content: expected a string or a list of text parts, got "
                    "none (only assistant messages may leave it out)"
                ),
                f"messages[{i}].content",
            )
        texts.append(_content_text(content))
    text = "".join(texts)
    keep = _kept_tokens(state, body.truncate_prompt_tokens)
    if keep is None:
        state.refuse_text_that_cannot_fit(text, "messages", "characters of content")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tools = getattr(body, "tools", None) or None
    add_generation_prompt = body.add_generation_prompt
    if body.continue_final_message and "add_generation_prompt" not in body.model_fields_set:
        add_generation_prompt = None  # (the tokenizer's: not when continuing)
    if body.chat_template is not None and not state.config.trust_request_chat_template:
        raise with_param(
            RequestError(
                "chat_template: this server does not take a request's chat template (it would "
                "run the request's jinja2 here); its operator can allow it with "
                "--trust_request_chat_template"
            ),
            "chat_template",
        )
    try:
        ids = state.tokenizer.encode_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=_template_kwargs(body),
            template=body.chat_template,
        )
    except RequestError as e:
        if getattr(e, "param", None) is None:
            field = str(e).split(":", 1)[0]  # e.g. "messages[1].content"
            root = re.split(r"[.\[]", field, maxsplit=1)[0]
            if " " in field or root not in _CHAT_FIELDS:
                field = "messages"  # the chat template's own refusal
            raise with_param(e, field) from None
        raise
    return ids[-keep:] if keep else ids

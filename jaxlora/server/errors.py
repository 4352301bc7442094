"""OpenAI-style error answers: every failure becomes ``{"error": {...}}`` with the right status.

Handlers raise the library's own exceptions (jaxlora.errors); this module is the one place that
maps them to HTTP: unknown model or adapter 404, invalid request or adapter 400, missing API key
401, full queue 503, anything unexpected 500 (logged; no traceback goes to the client).
"""

from __future__ import annotations

import json
import logging
import math
import re

from fastapi.responses import JSONResponse

from jaxlora.errors import (
    AdapterError,
    ConfigError,
    FormatError,
    JaxloraError,
    PoolExhaustedError,
    RequestError,
    UnknownAdapterError,
)

log = logging.getLogger("jaxlora.server")

# Seconds a client is told to wait before retrying an overloaded server.
RETRY_AFTER_S = 1


class AuthenticationError(JaxloraError):
    """The request has no API key or a wrong one."""


class PermissionDeniedError(JaxloraError):
    """The request's API key may not do what it asks (an admin route with a tenant's key)."""


class RateLimitError(JaxloraError):
    """The request's API key has as many generations in flight, or has used as many tokens
    this minute, as it may (429, Retry-After: ``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class NotFoundError(JaxloraError):
    """A stored object the request names (a response) does not exist (404)."""


# Request fields an engine RequestError message may start with ("max_tokens: ...").
REQUEST_FIELDS = (
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "logprobs",
    "n",
    "messages",
    "bad_words",
    "priority",
    "continue_final_message",
    "chat_template_kwargs",
)


def with_param(error: JaxloraError, param: str | None) -> JaxloraError:
    """Tags an exception with the request field it is about (the ``param`` of the answer)."""
    error.param = param
    return error


def renamed_param(error: JaxloraError, fields: dict[str, str]) -> JaxloraError:
    """An error about the request another request was served as (a chat, a completion), naming
    the field of the request the client sent instead: ``fields`` maps a top-level field of the
    first to its name in the second (its index or sub-field path is dropped: an index into a
    chat's ``messages`` is no index the client wrote). Other errors pass unchanged."""
    # (the engine's errors name their field at the start of the message only)
    param = getattr(error, "param", None) or str(error).split(":", 1)[0]
    root = param.split(".")[0].split("[")[0]
    if root not in fields:
        return error
    message = str(error)
    head, colon, rest = message.partition(":")
    if colon and head.split(".")[0].split("[")[0] == root:
        message = fields[root] + colon + rest
    return with_param(type(error)(message), fields[root])


def status_of(error: BaseException) -> tuple[int, str, str | None]:
    """(HTTP status, OpenAI error type, code) of an exception."""
    if isinstance(error, AuthenticationError):
        return 401, "authentication_error", "invalid_api_key"
    if isinstance(error, RateLimitError):
        return 429, "rate_limit_error", "rate_limit_exceeded"
    if isinstance(error, PermissionDeniedError):
        return 403, "permission_error", "permission_denied"
    if isinstance(error, EngineRequestError):
        return 500, "server_error", "engine_error"
    if isinstance(error, UnknownAdapterError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, NotFoundError):
        return 404, "invalid_request_error", None
    if isinstance(error, PoolExhaustedError):
        return 503, "server_error", "overloaded"
    if isinstance(error, ConfigError):
        # At request time only the server's own configuration can be wrong: not the client's
        # fault. (A model's chat template that does not parse or render is a RequestError, a
        # 400 as in vLLM: jaxlora.tokenizer.)
        return 500, "server_error", "server_config"
    if isinstance(error, (RequestError, AdapterError, FormatError)):
        return 400, "invalid_request_error", None
    if isinstance(error, JaxloraError):
        return 400, "invalid_request_error", None
    return 500, "server_error", "internal_error"


class ErrorJSONResponse(JSONResponse):
    """An error answer in ASCII-only JSON: a message may quote client text that cannot be
    encoded as UTF-8 (a lone surrogate such as "\\ud800"), which must not turn it into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_payload(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": code if code is not None else str(status),
        }
    }


def _retry_after(status: int, wait_s: float = RETRY_AFTER_S) -> dict | None:
    """The Retry-After header of an overloaded (503) or rate-limited (429) answer: whole
    seconds, at least one."""
    if status not in (429, 503):
        return None
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}


def error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "server_error"
    headers = _retry_after(status)
    return ErrorJSONResponse(
        error_payload(status, message, type_=type_, param=param, code=code),
        status_code=status,
        headers=headers,
    )


def describe(error: BaseException) -> tuple[int, dict]:
    """(status, payload) of an exception; unexpected exceptions are logged, not shown."""
    status, type_, code = status_of(error)
    if status == 500 and not isinstance(error, JaxloraError):
        log.error("unexpected error while serving a request", exc_info=error)
        message = f"internal server error ({type(error).__name__}); see the server log"
    else:
        message = str(error)
    param = getattr(error, "param", None)
    if param is None and status == 400:
        # The engine's validation messages start with the request field they are about
        # ("max_tokens: ...", "messages[0].content: ...").
        field = message.split(":", 1)[0]
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        param = field if root in REQUEST_FIELDS and " " not in field else None
    return status, error_payload(status, message, type_=type_, param=param, code=code)


def tgi_error(status: int, payload: dict) -> tuple[int, dict]:
    """An OpenAI-shaped error answer (``error_payload``) in text-generation-inference's shape,
    as LoRAX's routes answer: ``{"error": message, "error_type": ...}`` with TGI's statuses, a
    refused request 422 ("validation"), an overloaded server 429 ("overloaded"), a failed
    generation 424 ("generation"); other statuses (401, 404, ...) keep theirs, with no type.
    The message starts with the request field it is about, where the error names one. TGI's
    clients (lorax-client, text-generation) raise their error classes from these."""
    error = payload.get("error")
    message = error.get("message", "") if isinstance(error, dict) else str(error)
    param = error.get("param") if isinstance(error, dict) else None
    if param and not message.startswith(param):
        message = f"{param}: {message}"  # (TGI's shape has no field of its own for it)
    if status in (400, 413, 422):
        return 422, {"error": message, "error_type": "validation"}
    if status in (429, 503):
        return 429, {"error": message, "error_type": "overloaded"}
    if status >= 500:
        return 424, {"error": message, "error_type": "generation"}
    return status, {"error": message}


def exception_response(error: BaseException) -> JSONResponse:
    status, payload = describe(error)
    headers = _retry_after(status, getattr(error, "retry_after", RETRY_AFTER_S))
    return ErrorJSONResponse(payload, status_code=status, headers=headers)


class EngineRequestError(JaxloraError):
    """The engine ended a valid request with an error of its own (500)."""

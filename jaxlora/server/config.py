"""The server's own settings (the engine's are jaxlora.engine.EngineConfig)."""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxlora.errors import ConfigError
from jaxlora.formats.hf import GENERATION_DEFAULT_FIELDS
from jaxlora.sampling import MAX_LOGPROBS
from jaxlora.server.keys import ApiKey, check_keys, with_server_key
from jaxlora.server.reasoning import REASONING_PARSERS
from jaxlora.server.tool_calls import PARSERS

# Fields that must be bools, and the flag of each that has one (scripts/serve.py).
_BOOL_FIELDS = {
    "load_adapters_on_demand": " (--load_adapters_on_demand)",
    "auto_tool_choice": " (--enable_auto_tool_choice)",
    "allow_credentials": " (--allow_credentials)",
    "return_tokens_as_token_ids": " (--return_tokens_as_token_ids)",
    "enable_prompt_tokens_details": " (--enable_prompt_tokens_details)",
    "docs": " (--docs)",
    "log_requests": " (--log_requests)",
    "metrics_need_key": " (--metrics_need_key)",
    "trust_request_chat_template": " (--trust_request_chat_template)",
}


def _is_seconds(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """model_name: what clients put in `model` for the base model (adapters use their own names).
    api_key: required as ``Authorization: Bearer <key>`` on /v1/* (None: no key).
    adapter_roots: directories that POST /v1/load_lora_adapter may read adapters from (after
    resolving symlinks); empty: runtime loading is refused.
    max_n: most choices one request may ask for (n times the number of prompts).
    first_token_deadline_s: a request not started within this many seconds is dropped with 503
    (S-LoRA's admission control; None: requests wait as long as the queue lets them).
    stream_poll_s: how often the server collects new tokens from the engine for all open
    requests (one poller for all of them, so the cost does not grow with the number of streams).
    stream_interval: tokens a streamed chunk carries at least (a request's first token always
    goes out alone, at once; its end whenever it comes): n > 1 sends n times fewer chunks, for
    n times less of the server's work a token (shared with the engine's host work near
    capacity), at the cost of smoothness (``jaxlora.server.generation``).
    switch_interval_s: the interpreter's thread switch interval while the app runs
    (``sys.setswitchinterval``, process-wide; restored at its shutdown): the engine's host work
    and the server's handlers share one interpreter lock, and a thread that wants it back (the
    engine, after each step it hands to the device) waits up to this long while another runs
    Python. None: the interpreter's own (5 ms).
    disconnect_poll_s: how often a non-streaming request checks that its client is still there.
    default_max_tokens: max_tokens of a completion that gives none (chat: the rest of the
    context).
    max_body_bytes: request bodies larger than this are refused (413) before they are read;
    the default holds 16 prompts of 128K token ids.
    max_stop_strings: most stop strings a request may give (each is matched against every
    generated piece of text on the engine's thread, which every request shares).
    load_adapters_on_demand: a request whose `model` names no registered adapter loads the
    adapter directory of that relative path under the adapter roots first (LoRAX's dynamic
    adapter loading, vLLM's LoRA resolver), so that adapters dropped into a root after start
    need no load call. Needs adapter_roots.
    tool_call_parser: how chat answers' tool calls are read back when a request offers tools
    ("hermes", "llama3_json", "mistral" or "pythonic", jaxlora.server.tool_calls; None:
    requests with tools and tool_choice other than "none" are refused).
    auto_tool_choice: chats offering tools with tool_choice "auto" (or none given, OpenAI's
    default then) let the model call them and read the calls back with tool_call_parser;
    False (vLLM's default, without --enable-auto-tool-choice): such requests are refused (400,
    naming the flag), while "none", "required" and a named function still work.
    reasoning_parser: how chat answers' reasoning is read apart from their content
    ("deepseek_r1" or "qwen3", jaxlora.server.reasoning; None: the answer is all content).
    max_stored_responses: the Responses API's responses kept in memory (the most recent ones;
    past it, of the API key that holds the most), for GET /v1/responses/{id} and
    previous_response_id.
    allowed_origins: web origins whose pages may call the server from a browser (CORS; "*":
    any); empty: no CORS headers, browsers refuse cross-origin calls. allow_credentials,
    allowed_methods, allowed_headers: the rest of its CORS answer (vLLM's options).
    return_tokens_as_token_ids: logprobs name tokens "token_id:<id>" in every answer, as the
    request field asks for one (vLLM's --return-tokens-as-token-ids).
    enable_prompt_tokens_details: a whole answer's usage (and a stream's last usage chunk)
    counts the prompt tokens whose K/V were already computed, by the prefix cache or by a
    request of the same prompt, as prompt_tokens_details.cached_tokens (vLLM's
    --enable-prompt-tokens-details); False: prompt_tokens_details null, as vLLM's default.
    docs: the OpenAPI schema and its pages (/docs, /redoc, /openapi.json); False: none
    (vLLM's --disable-fastapi-docs).
    max_logprobs: the most logprobs a token a request may ask for (0..20; vLLM's
    --max-logprobs): top_logprobs, logprobs, prompt_logprobs, LoRAX's alternatives.
    response_role: the role of a chat answer where the prompt asks for a new message
    (add_generation_prompt); otherwise the answer continues the last message, and has its
    role (vLLM's --response-role and its reading).
    log_requests: one log line (INFO, logger jaxlora.server) a finished request: its id,
    model, token counts, finish reason, time to first token and end to end, preemptions.
    api_keys: tenants' keys, each for some models only (``jaxlora.server.keys``; beside
    api_key, which reaches everything).
    fair_share_by: who a share of service is under the engine's "fair" scheduling policy:
    "model" (each adapter, and the base model) or "key" (each API key's name: a customer's
    requests to all its adapters count together). "key" needs keys.
    metrics_need_key: GET /metrics takes an admin key (it shows every key's usage); off by
    default, as vLLM's, for scrapers inside the deployment. Needs keys.
    sampling_defaults: (name, value) pairs a request that leaves the field unset gets instead of
    OpenAI's default: temperature, top_p, top_k, min_p, repetition_penalty, max_tokens (the
    model's generation_config.json, vLLM's --generation-config auto;
    jaxlora.formats.hf.read_generation_defaults).
    trust_request_chat_template: a chat request's own ``chat_template`` (jinja2, sandboxed) is
    rendered; off by default, as vLLM's --trust-request-chat-template, since a template can
    loop for as long as it likes on the server.
    max_request_merges: LoRAX's per-request ``merged_adapters`` kept as adapters at most (each
    distinct merge is computed once and registered as ``merged-<digest>``; past this many the
    least recently requested that no request waits for or runs on is unloaded, and one in use
    stays until a later merge finds it unused); 0: such requests are refused.
    """

    model_name: str
    api_key: str | None = None
    adapter_roots: tuple[str, ...] = ()
    max_n: int = 16
    first_token_deadline_s: float | None = None
    stream_poll_s: float = 0.002
    stream_interval: int = 1
    switch_interval_s: float | None = None
    disconnect_poll_s: float = 0.25
    default_max_tokens: int = 16
    max_body_bytes: int = 32 * 2**20
    max_stop_strings: int = 64
    load_adapters_on_demand: bool = False
    tool_call_parser: str | None = None
    auto_tool_choice: bool = True
    reasoning_parser: str | None = None
    max_stored_responses: int = 1000
    allowed_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    docs: bool = True
    max_logprobs: int = MAX_LOGPROBS
    response_role: str = "assistant"
    log_requests: bool = False
    api_keys: tuple[ApiKey, ...] = ()
    fair_share_by: str = "model"
    metrics_need_key: bool = False
    sampling_defaults: tuple[tuple[str, float | int], ...] = ()
    trust_request_chat_template: bool = False
    max_request_merges: int = 8

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """Every key the server takes: the tenants' and ``api_key`` (an admin of every model,
        named "api_key"); empty: no key is needed."""
        return with_server_key(self.api_keys, self.api_key)

    def __post_init__(self):
        for field, flag in _BOOL_FIELDS.items():
            value = getattr(self, field)
            if not isinstance(value, bool):  # ("false" or 0 would read as their truth value)
                raise ConfigError(
                    f"server config field {field!r}{flag}: expected True or False, got {value!r}"
                )
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(
                "server config field 'model_name' (--served_model_name): expected a non-empty "
                f"string, got {self.model_name!r}"
            )
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError(
                "server config field 'api_key' (--api_key): expected a non-empty string or None"
            )
        if not isinstance(self.api_keys, tuple) or not all(
            isinstance(k, ApiKey) for k in self.api_keys
        ):
            raise ConfigError("server config field 'api_keys': expected a tuple of ApiKey")
        check_keys(self.keys, "server config field 'api_keys'")
        if self.fair_share_by not in ("model", "key"):
            raise ConfigError(
                "server config field 'fair_share_by': expected 'model' or 'key', got "
                f"{self.fair_share_by!r}"
            )
        if self.metrics_need_key and not self.keys:
            raise ConfigError(
                "server config field 'metrics_need_key': needs API keys (--api_keys_file or "
                "--api_key)"
            )
        if self.fair_share_by == "key" and not self.keys:
            raise ConfigError(
                "server config field 'fair_share_by': 'key' needs API keys (--api_keys_file or "
                "--api_key)"
            )
        if isinstance(self.adapter_roots, (str, bytes, os.PathLike)) or not all(
            isinstance(r, (str, os.PathLike)) for r in self.adapter_roots
        ):
            raise ConfigError(
                "server config field 'adapter_roots' (--allowed_adapter_roots): expected a tuple "
                f"of directories, got {self.adapter_roots!r}"
            )
        roots = tuple(os.fspath(r) for r in self.adapter_roots)
        for root in roots:
            if not os.path.isdir(root):
                raise ConfigError(
                    "server config field 'adapter_roots' (--allowed_adapter_roots): "
                    f"{root!r} is not a directory"
                )
        object.__setattr__(self, "adapter_roots", roots)
        if self.tool_call_parser not in (None, *PARSERS):
            raise ConfigError(
                "server config field 'tool_call_parser' (--tool_call_parser): expected one of "
                f"{list(PARSERS)} or None, got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ConfigError(
                f"server config field 'reasoning_parser' (--reasoning_parser): expected one of "
                f"{list(REASONING_PARSERS)} or None, got {self.reasoning_parser!r}"
            )
        origins = self.allowed_origins
        if not isinstance(origins, tuple) or not all(
            isinstance(o, str) and (o == "*" or re.fullmatch(r"https?://[^/\s]+", o))
            for o in origins
        ):
            raise ConfigError(
                "server config field 'allowed_origins' (--allowed_origins): expected a tuple of "
                f"origins (scheme://host[:port], or '*'), got {origins!r}"
            )
        if (
            isinstance(self.max_logprobs, bool)
            or not isinstance(self.max_logprobs, int)
            or not 0 <= self.max_logprobs <= MAX_LOGPROBS
        ):
            raise ConfigError(
                f"server config field 'max_logprobs' (--max_logprobs): expected an int in "
                f"0..{MAX_LOGPROBS} (the sampler's most), got {self.max_logprobs!r}"
            )
        if (
            isinstance(self.max_request_merges, bool)
            or not isinstance(self.max_request_merges, int)
            or self.max_request_merges < 0
        ):
            raise ConfigError(
                "server config field 'max_request_merges' (--max_request_merges): expected an "
                f"int >= 0, got {self.max_request_merges!r}"
            )
        if not isinstance(self.response_role, str) or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_-]*", self.response_role
        ):
            raise ConfigError(
                "server config field 'response_role' (--response_role): expected a role name "
                f"(letters, digits, _ or -), got {self.response_role!r}"
            )
        for field in ("allowed_methods", "allowed_headers"):
            value = getattr(self, field)
            if (
                not isinstance(value, tuple)
                or not value
                or not all(
                    isinstance(v, str) and v and not any(c.isspace() for c in v) for v in value
                )
            ):
                raise ConfigError(
                    f"server config field {field!r} (--{field}): expected a non-empty tuple of "
                    f"names (or '*'), got {value!r}"
                )
        if self.load_adapters_on_demand and not roots:
            raise ConfigError(
                "server config field 'load_adapters_on_demand': needs adapter_roots "
                "(--allowed_adapter_roots: the directories adapters are loaded from), got none"
            )
        for field in (
            "max_n",
            "stream_interval",
            "default_max_tokens",
            "max_body_bytes",
            "max_stop_strings",
            "max_stored_responses",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = " (--max_body_mib, in MiB)" if field == "max_body_bytes" else ""
                raise ConfigError(
                    f"server config field {field!r}{flag}: expected an int >= 1, got {value!r}"
                )
        for field in ("stream_poll_s", "disconnect_poll_s"):
            value = getattr(self, field)
            # (inf: the stream poller, or the disconnect check, would never run again)
            if not _is_seconds(value):
                raise ConfigError(
                    f"server config field {field!r}: expected finite seconds > 0, got {value!r}"
                )
        interval = self.switch_interval_s
        # (Python refuses 0 and takes at most about 2**31 microseconds' worth of a float)
        if interval is not None and not (_is_seconds(interval) and interval <= 1.0):
            raise ConfigError(
                "server config field 'switch_interval_s' (--switch_interval_ms, in ms): "
                f"expected None or finite seconds in (0, 1], got {interval!r}"
            )
        checks = {
            name: (check, expected) for name, check, expected in GENERATION_DEFAULT_FIELDS.values()
        }
        if not isinstance(self.sampling_defaults, tuple):
            raise ConfigError(
                "server config field 'sampling_defaults': expected a tuple of (name, number) "
                f"pairs, got {self.sampling_defaults!r}"
            )
        for pair in self.sampling_defaults:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and pair[0] in checks
                and isinstance(pair[1], (int, float))
                and not isinstance(pair[1], bool)
            ):
                raise ConfigError(
                    "server config field 'sampling_defaults': expected (name, number) pairs "
                    f"with names in {sorted(checks)}, got {pair!r}"
                )
            check, expected = checks[pair[0]]
            if not check(pair[1]):  # (what generation_config.json may hold: --generation_config)
                raise ConfigError(
                    f"server config field 'sampling_defaults': {pair[0]}: expected {expected}, "
                    f"got {pair[1]!r}"
                )
        deadline = self.first_token_deadline_s
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0
        ):
            raise ConfigError(
                f"server config field 'first_token_deadline_s' (--first_token_deadline_s): "
                f"expected seconds "
                f"> 0 or None, got {deadline!r}"
            )

"""LoRAX's (and text-generation-inference's) native API: ``POST /generate`` and
``POST /generate_stream``, so that ``lorax-client``, TGI clients and scripts written for LoRAX
reach this server's adapters unchanged.

A request is ``{"inputs": "...", "parameters": {"adapter_id": ..., "max_new_tokens": ...}}``.
It is served as the completion it describes (``completion_body``: the same prompt handling,
sampling, stop strings, structured output and adapter routing as ``/v1/completions``); the
answer is LoRAX's: ``generated_text`` and, with ``details``, the finish reason
(``length``, ``eos_token`` or ``stop_sequence``), the token counts, each generated token (id,
text, logprob, special, alternatives with ``return_k_alternatives``) and, with
``decoder_input_details``, the prompt's tokens with their logprobs. Streamed, one event a
generated token, the last one with the whole text and the details.

Errors are TGI's: ``{"error": message, "error_type": ...}``, a refused request 422
("validation"), an overloaded server 429 ("overloaded"), a failed generation 424
("generation"), others (401, 404) with their status (``jaxlora.server.errors.tgi_error``); a
stream's error is an event of that shape. What this server cannot honour is refused at anything
but its neutral value (422, the message naming the ``parameters`` field): an ``adapter_source``
other than ``local`` (adapters are the registered ones, or with ``--load_adapters_on_demand``
directories under ``--allowed_adapter_roots``, named by their path there or, as LoRAX's local
adapters are, by their absolute path; no Hub, S3 or Predibase download), ``api_token``,
``typical_p``, ``watermark`` and ``best_of`` > 1.

``merged_adapters`` (LoRAX's per-request merge: ``ids``, ``weights``, ``merge_strategy``
"linear" / "ties" / "dare_linear" / "dare_ties", ``density``, ``majority_sign_method`` "total" /
"frequency") runs the request on LoRAX's merge of those registered adapters' A and B
(``jaxlora.lora.merge_lora_parameters``), computed once per distinct merge and kept as an
adapter (``ServerState.request_merge``, ``--max_request_merges``); ``adapter_id`` must then be
unset.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal, NamedTuple

from pydantic import Field

from jaxlora.errors import JaxloraError, RequestError
from jaxlora.lora import MAJORITY_SIGN_METHODS, PARAMETER_MERGES
from jaxlora.server.errors import renamed_param, with_param

# (strict as the OpenAI bodies are: "5" is no int, 1 is a float; unknown fields refused)
from jaxlora.server.protocol import CompletionRequest, _Body

# The routes of this API (POST; "/" is lorax-client's, as TGI's): their errors take TGI's shape.
ROUTES = ("/generate", "/generate_stream", "/")


class MergedAdapters(_Body):
    ids: list[str] = Field(description="The registered adapters to merge (1..16).")
    weights: list[float] = Field(
        [], description="One weight an adapter ([]: 1 each, LoRAX's default)."
    )
    merge_strategy: str | None = Field(
        None, description="'linear' (None), 'ties', 'dare_linear' or 'dare_ties'."
    )
    density: float = Field(1.0, description="The share of values TIES / DARE keep, in [0, 1].")
    majority_sign_method: str | None = Field(
        None, description="TIES's sign election: 'total' (None) or 'frequency'."
    )


# Most adapters one per-request merge may name.
MAX_MERGED_ADAPTERS = 16


class MergeSpec(NamedTuple):
    """A request's merged_adapters, checked and with LoRAX's defaults filled in."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str
    density: float
    majority_sign_method: str


def merge_spec(parameters: GenerateParameters) -> MergeSpec | None:
    """The request's merge (None without merged_adapters); RequestError (422) naming the
    ``parameters.merged_adapters`` field that is wrong."""
    merged = parameters.merged_adapters
    if merged is None:
        return None
    if parameters.adapter_id is not None:
        raise _refuse(
            "adapter_id", "expected none beside merged_adapters (the merge is the adapter)"
        )
    ids = tuple(merged.ids)
    if not 1 <= len(ids) <= MAX_MERGED_ADAPTERS:
        raise _refuse(
            "merged_adapters.ids",
            f"expected 1..{MAX_MERGED_ADAPTERS} adapter names, got {len(ids)}",
        )
    for i, name in enumerate(ids):
        if not name:
            raise _refuse(f"merged_adapters.ids[{i}]", "expected an adapter name, got ''")
    weights = tuple(float(w) for w in merged.weights) or (1.0,) * len(ids)
    if len(weights) != len(ids):
        raise _refuse(
            "merged_adapters.weights",
            f"expected one weight an adapter ({len(ids)}) or none, got {len(weights)}",
        )
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise _refuse(f"merged_adapters.weights[{i}]", f"expected a finite number, got {w}")
    strategy = (merged.merge_strategy or "linear").lower()
    if strategy not in PARAMETER_MERGES:
        raise _refuse(
            "merged_adapters.merge_strategy",
            f"expected one of {', '.join(PARAMETER_MERGES)}, got {merged.merge_strategy!r}",
        )
    if not 0 <= merged.density <= 1:
        raise _refuse(
            "merged_adapters.density", f"expected a number in [0, 1], got {merged.density}"
        )
    method = (merged.majority_sign_method or "total").lower()
    if method not in MAJORITY_SIGN_METHODS:
        raise _refuse(
            "merged_adapters.majority_sign_method",
            f"expected one of {', '.join(MAJORITY_SIGN_METHODS)}, "
            f"got {merged.majority_sign_method!r}",
        )
    return MergeSpec(ids, weights, strategy, float(merged.density), method)


class LoraxResponseFormat(_Body):
    type: Literal["json_object"] = Field(description="'json_object' (LoRAX's one type).")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON schema the output is an instance of."
    )


class TgiGrammar(_Body):
    type: Literal["json", "json_object", "regex"] = Field(
        description="'json' (a JSON schema) or 'regex' (TGI's)."
    )
    value: dict[str, Any] | str = Field(description="The schema, or the regular expression.")


class GenerateParameters(_Body):
    """LoRAX's (and TGI's) generation parameters. lorax-client sends every one, unset ones as
    null (or false / []), so each takes its neutral value too."""

    adapter_id: str | None = Field(
        None, description="A registered adapter's name (None: the base model)."
    )
    adapter_source: str | None = Field(None, description="'local' or None only.")
    merged_adapters: MergedAdapters | None = Field(
        None, description="LoRAX's per-request merge of registered adapters (adapter_id unset)."
    )
    api_token: str | None = Field(None, description="Not used (None).")
    do_sample: bool = Field(
        False, description="Sample; false: greedy unless a sampling parameter is given."
    )
    max_new_tokens: int | None = Field(None, description="Tokens to generate at most.")
    ignore_eos_token: bool = Field(False, description="Go on past the EOS token.")
    repetition_penalty: float | None = Field(None, description="> 0; 1: none.")
    frequency_penalty: float | None = Field(None, description="TGI's, as OpenAI's.")
    return_full_text: bool = Field(False, description="Prepend the prompt to the text.")
    stop: list[str] = Field(
        [], description="Texts that end the output (kept in it, as TGI's and LoRAX's are)."
    )
    seed: int | None = Field(None, description="Sampling seed (>= 0).")
    temperature: float | None = Field(None, description="> 0 (sampling).")
    top_k: int | None = Field(None, description="> 0 (sampling).")
    top_p: float | None = Field(None, description="In (0, 1) (sampling).")
    truncate: int | None = Field(None, description="Keep the prompt's last k tokens.")
    typical_p: float | None = Field(None, description="Not supported (None).")
    best_of: int | None = Field(None, description="1 or None only.")
    watermark: bool = Field(False, description="Not supported (false).")
    details: bool = Field(False, description="Return the tokens and the finish reason.")
    decoder_input_details: bool = Field(
        False, description="With details: the prompt's tokens and their logprobs too."
    )
    return_k_alternatives: int | None = Field(
        None, description="The k most likely tokens at each step (1..20)."
    )
    top_n_tokens: int | None = Field(
        None, description="TGI's: the n most likely tokens at each step, as top_tokens."
    )
    response_format: LoraxResponseFormat | None = Field(
        None, description="{'type': 'json_object', 'schema': {...}}: JSON output."
    )
    grammar: TgiGrammar | None = Field(
        None, description="TGI's: {'type': 'json', 'value': schema} or {'type': 'regex', ...}."
    )


class GenerateRequest(_Body):
    inputs: str = Field(description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(
        False,
        description="POST /: stream the answer (as generate_stream); /generate refuses it, "
        "/generate_stream always streams.",
    )


def _refuse(field: str, message: str) -> RequestError:
    return with_param(RequestError(f"parameters.{field}: {message}"), f"parameters.{field}")


# /v1/completions fields a completion_body error may name, and the LoRAX field each came from.
_FIELDS = {
    "prompt": "inputs",
    "model": "parameters.adapter_id",
    "max_tokens": "parameters.max_new_tokens",
    "temperature": "parameters.temperature",
    "top_p": "parameters.top_p",
    "top_k": "parameters.top_k",
    "repetition_penalty": "parameters.repetition_penalty",
    "frequency_penalty": "parameters.frequency_penalty",
    "stop": "parameters.stop",
    "seed": "parameters.seed",
    "truncate_prompt_tokens": "parameters.truncate",
    "structured_outputs": "parameters.response_format",  # (or grammar: see renamed)
    "logprobs": "parameters.return_k_alternatives",
    "n": "parameters.best_of",
}


def renamed(error: JaxloraError, body: GenerateRequest) -> JaxloraError:
    """An error about the completion a request became, naming the LoRAX field instead."""
    fields = _FIELDS
    if body.parameters.grammar is not None:
        fields = {**_FIELDS, "structured_outputs": "parameters.grammar"}
    return renamed_param(error, fields)


def alternatives_of(parameters: GenerateParameters) -> int | None:
    """The most likely tokens asked for at each step: LoRAX's return_k_alternatives (each
    token's alternative_tokens) or TGI's top_n_tokens (top_tokens), not both."""
    k, n = parameters.return_k_alternatives, parameters.top_n_tokens
    if k and n:
        raise _refuse("top_n_tokens", "give return_k_alternatives (LoRAX's) or this, not both")
    for field, value in (("return_k_alternatives", k), ("top_n_tokens", n)):
        if value is not None and not 0 <= value <= 20:
            raise _refuse(field, f"expected 0..20, got {value}")
    return k or n or None


def local_adapter_name(adapter_id: str, roots: tuple[str, ...]) -> str:
    """LoRAX names a local adapter by its directory's path: an absolute one inside an allowed
    adapter root is the name on-demand loading gives it (its path relative to the root); any
    other name is itself."""
    if not os.path.isabs(adapter_id):
        return adapter_id
    path = os.path.normpath(adapter_id)
    for root in roots:
        root = os.path.normpath(os.path.abspath(root))
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root)
    return adapter_id


def completion_body(
    body: GenerateRequest, base_model: str, adapter_roots: tuple[str, ...] = ()
) -> CompletionRequest:
    """The /v1/completions request a LoRAX request describes (its errors name the LoRAX
    fields, ``renamed``); an adapter given by its path inside ``adapter_roots`` is named as
    ``local_adapter_name`` says. Its merged_adapters are ``merge_spec``'s (the caller checks
    them first)."""
    p = body.parameters
    if p.adapter_source not in (None, "local"):
        raise _refuse(
            "adapter_source",
            f"expected 'local' or none, got {p.adapter_source!r} (this server serves the "
            "adapters it has registered, or with --load_adapters_on_demand the directories "
            "under its --allowed_adapter_roots; it downloads none)",
        )
    for field, neutral in (("api_token", None), ("typical_p", None), ("watermark", False)):
        if getattr(p, field) != neutral:
            raise _refuse(field, f"not supported (expected {neutral!r}, the default)")
    if p.best_of not in (None, 1):
        raise _refuse("best_of", f"expected 1 or none, got {p.best_of!r}")
    if p.temperature is not None and p.temperature <= 0:
        raise _refuse(
            "temperature", f"expected > 0 (greedy is do_sample false), got {p.temperature}"
        )
    if p.top_p is not None and not 0 < p.top_p < 1:
        raise _refuse("top_p", f"expected a value in (0, 1), got {p.top_p}")
    if p.top_k is not None and p.top_k <= 0:
        raise _refuse("top_k", f"expected > 0, got {p.top_k}")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise _refuse("repetition_penalty", f"expected > 0, got {p.repetition_penalty}")
    if p.seed is not None and p.seed < 0:
        raise _refuse("seed", f"expected >= 0, got {p.seed}")
    if p.truncate is not None and p.truncate <= 0:
        raise _refuse("truncate", f"expected > 0, got {p.truncate}")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _refuse("max_new_tokens", f"expected > 0, got {p.max_new_tokens}")
    if p.decoder_input_details and not p.details:
        raise _refuse("decoder_input_details", "needs details true")
    if not body.inputs:
        raise with_param(RequestError("inputs: expected a non-empty prompt"), "inputs")
    # TGI samples where do_sample is set or a parameter changes the distribution (a warper):
    # temperature 1, top_k 0 and top_p absent leave it greedy.
    sampled = (
        p.do_sample
        or p.temperature not in (None, 1.0)
        or p.top_k not in (None, 0)
        or p.top_p is not None
    )
    completion: dict[str, Any] = {
        "model": (
            local_adapter_name(p.adapter_id, adapter_roots)
            if p.adapter_id is not None
            else base_model
        ),
        "prompt": body.inputs,
        "max_tokens": p.max_new_tokens,
        # greedy unless sampling was asked for (TGI's reading of do_sample)
        "temperature": (p.temperature if p.temperature is not None else 1.0) if sampled else 0.0,
        "top_p": p.top_p if sampled else None,
        "top_k": p.top_k if sampled else None,
        "repetition_penalty": p.repetition_penalty,
        "frequency_penalty": p.frequency_penalty,
        "stop": list(p.stop) or None,
        # TGI's (and LoRAX's) text is every generated token's, the stop sequence's too
        "include_stop_str_in_output": True if p.stop else None,
        "seed": p.seed,
        "ignore_eos": p.ignore_eos_token,
        "truncate_prompt_tokens": p.truncate,
    }
    if p.response_format is not None and p.grammar is not None:
        raise _refuse("grammar", "give response_format (LoRAX's) or grammar (TGI's), not both")
    if p.response_format is not None:
        schema = p.response_format.schema_
        completion["structured_outputs"] = (
            {"json": schema} if schema is not None else {"json_object": True}
        )
    elif p.grammar is not None:
        kind = "regex" if p.grammar.type == "regex" else "json"
        value = p.grammar.value
        if kind == "json" and isinstance(value, str):
            try:  # (TGI's: a JSON schema may come as its JSON text)
                value = json.loads(value)
            except ValueError:
                pass
        if not isinstance(value, str if kind == "regex" else dict):
            expected = "a regular expression" if kind == "regex" else "a JSON schema (an object)"
            raise _refuse("grammar.value", f"expected {expected} for type {p.grammar.type!r}")
        completion["structured_outputs"] = {kind: value}
    return CompletionRequest.model_validate(
        {k: v for k, v in completion.items() if v is not None}, strict=False
    )


def finish_reason(request, eos_ids: set[int]) -> str:
    """LoRAX's finish reason of a finished engine request."""
    if str(request.finish_reason) == "length":
        return "length"
    ids = request.output_ids
    if ids and ids[-1] in eos_ids and not request.sampling.ignore_eos:
        return "eos_token"
    return "stop_sequence"


def seed_of(request) -> int | None:
    """The seed a sampled request drew with (LoRAX reports none for greedy decoding)."""
    return request.sampling.seed if request.sampling.temperature > 0 else None


def details_of(request, prompt_tokens: int, eos_ids: set[int]) -> dict:
    """What every answer's details say of a finished request (generate's add its tokens,
    generate_stream's TGI's name of the prompt's length)."""
    return {
        "finish_reason": finish_reason(request, eos_ids),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": len(request.output_ids),
        "seed": seed_of(request),
    }


class TokenWriter:
    """LoRAX's token entries: id, text, logprob, special (and the alternatives)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special: set[int] = set()
        if tokenizer is not None:
            added = tokenizer.backend.get_added_tokens_decoder()
            self.special = {i for i, t in added.items() if t.special}
            self.special |= set(getattr(tokenizer, "eos_token_ids", ()) or ())

    def text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def alternatives(self, top: dict[int, float] | None, k: int | None) -> list[dict] | None:
        if not k:
            return None
        ranked = sorted((top or {}).items(), key=lambda item: -item[1])[:k]
        return [{"id": i, "text": self.text(i), "logprob": lp} for i, lp in ranked]

    def top_tokens(self, top: dict[int, float] | None, n: int) -> list[dict]:
        """TGI's top_tokens of one step: the n most likely, each a token entry."""
        ranked = sorted((top or {}).items(), key=lambda item: -item[1])[:n]
        return [
            {"id": i, "text": self.text(i), "logprob": lp, "special": i in self.special}
            for i, lp in ranked
        ]

    def token(self, token_id: int, text: str, logprob, top=None, k=None) -> dict:
        """A generated token's entry (with LoRAX's alternative_tokens where k is given)."""
        entry = {
            "id": token_id,
            "text": text,
            "logprob": logprob,
            "special": token_id in self.special,
            "skipped": False,
        }
        if k:
            entry["alternative_tokens"] = self.alternatives(top, k)
        return entry

    def tokens(self, ids, logprobs, tops, k) -> list[dict]:
        """Each generated token with its own text (a special token's as written)."""
        tops = tops or [None] * len(ids)
        return [
            self.token(t, self.text(t), lp, top, k)
            for t, lp, top in zip(ids, logprobs or [None] * len(ids), tops, strict=True)
        ]

    def prefill(self, ids, logprobs) -> list[dict]:
        """The prompt's tokens and their logprobs (None for the first: no context)."""
        logprobs = logprobs or [None] * len(ids)
        return [
            {"id": t, "text": self.text(t), "logprob": lp}
            for t, lp in zip(ids, logprobs, strict=True)
        ]

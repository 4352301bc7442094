"""Request bodies of the OpenAI-compatible API (pydantic: validation and the OpenAPI schema).

Fields follow the OpenAI API; ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``stop_token_ids``, ``include_stop_str_in_output``, ``ignore_eos``, ``prompt_logprobs``,
``bad_words``, ``allowed_token_ids``, ``skip_special_tokens``, ``return_tokens_as_token_ids``,
``return_token_ids``, ``truncate_prompt_tokens``, ``priority``, ``structured_outputs``, the chat's
``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs`` and ``echo``,
and the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` are
vLLM's extensions. Fields this server cannot honour (suffix, ...) are accepted only at their neutral
value, so that a client never silently gets something else than it asked for; unknown fields
are refused (400), as OpenAI does. Types are strict, as OpenAI's are: "5" or true is not taken for
an int, nor 1 or "yes" for a bool (400). A null is the field's default, as OpenAI's schema marks
its optional fields nullable (``"n": null``, ``"stream": null``: 1, false); a required field
given null is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _openai_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    # OpenAI's bounds: the server keeps it with a stored answer, beside no prompt that would
    # bound its size.
    if value is None:
        return value
    if len(value) > 16:
        raise ValueError(f"expected at most 16 key-value pairs, got {len(value)}")
    for key, text in value.items():
        if len(key) > 64:
            raise ValueError(f"key {key[:64]!r}...: expected at most 64 characters")
        if len(text) > 512:
            raise ValueError(f"the value of {key!r}: expected at most 512 characters")
    return value


Metadata = Annotated[dict[str, str] | None, AfterValidator(_openai_metadata)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # (no field's default differs from null where null is allowed: dropping it changes
        # nothing there, and gives the default where a client's library sends null for unset;
        # a required field keeps its null, refused by name)
        if isinstance(data, dict):
            optional = {
                key
                for name, field in cls.model_fields.items()
                if not field.is_required()
                for key in (name, field.alias)
            }
            return {k: v for k, v in data.items() if v is not None or k not in optional}
        return data


class StreamOptions(_Body):
    # (true unless given false, as vLLM's: stream_options {"continuous_usage_stats": true}
    # alone streams the usage)
    include_usage: bool = Field(True, description="Send a last chunk with the token usage.")
    continuous_usage_stats: bool = Field(
        False,
        description="With include_usage: every chunk also carries the usage so far (vLLM's).",
    )


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(description="'text', 'json_object' or 'json_schema'.")
    json_schema: dict[str, Any] | None = Field(
        None, description="With type 'json_schema': {'name': ..., 'schema': {...}}."
    )


class StructuredOutputs(_Body):
    """vLLM's structured_outputs: exactly one constraint on the output."""

    json_: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema the output is an instance of."
    )
    regex: str | None = Field(None, description="A regular expression the output matches.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(
        None, description="A Lark (or GBNF) grammar the output is a sentence of."
    )
    json_object: bool | None = Field(None, description="The output is a JSON object.")
    disable_any_whitespace: bool = Field(
        False, description="JSON without whitespace between its tokens."
    )


class _SamplingFields(_Body):
    model: str = Field(description="The base model's name or a registered adapter's name.")
    max_tokens: int | None = Field(None, description="Tokens to generate at most.")
    temperature: float | None = Field(None, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1].")
    top_k: int | None = Field(None, description="Keep the k most likely tokens (0 = off).")
    n: int = Field(1, description="Choices to generate for each prompt.")
    stream: bool = Field(False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None, description="Text that ends the output (not included in it)."
    )
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the output.")
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop string that ended the output in its text."
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")
    seed: int | None = Field(
        None, description="Random stream of the request (choice i uses seed + i)."
    )
    presence_penalty: float | None = Field(
        None, description="In [-2, 2]: subtracted once from every token already in the output."
    )
    frequency_penalty: float | None = Field(
        None, description="In [-2, 2]: subtracted for each time a token is in the output."
    )
    repetition_penalty: float | None = Field(
        None,
        description="> 0 (1 = off): logits of prompt and output tokens divided by it (if "
        "positive) or multiplied by it.",
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (a string) to a bias in [-100, 100] added to its logit."
    )
    min_p: float | None = Field(
        None, description="In [0, 1]: drop tokens less likely than min_p times the best one."
    )
    min_tokens: int | None = Field(
        None, description="Tokens to generate before EOS, stop tokens or stop strings count."
    )
    response_format: ResponseFormat | None = Field(
        None, description="'text', 'json_object' or 'json_schema' (constrained decoding)."
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraints: json, regex, choice, grammar or json_object."
    )
    guided_json: dict[str, Any] | str | None = Field(
        None, description="Older vLLM spelling of structured_outputs.json."
    )
    guided_regex: str | None = Field(None, description="Older vLLM spelling of ....regex.")
    guided_choice: list[str] | None = Field(None, description="Older vLLM spelling of ....choice.")
    guided_grammar: str | None = Field(None, description="Older vLLM spelling of ....grammar.")
    prompt_logprobs: int | None = Field(
        None,
        description="vLLM's: each prompt token's logprob and rank, and this many most likely "
        "tokens there (0..20).",
    )
    bad_words: list[str] | None = Field(
        None, description="vLLM's: words the output never contains (at most 256)."
    )
    priority: int = Field(
        0,
        description="vLLM's: lower is scheduled first (a server started with "
        "--scheduling_policy=priority; 0 otherwise).",
    )
    allowed_token_ids: list[int] | None = Field(
        None, description="vLLM's: the only tokens the output may take (EOS only if listed)."
    )
    skip_special_tokens: bool = Field(
        True, description="vLLM's: leave special tokens out of the output's text."
    )
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM's: logprobs name tokens as 'token_id:<id>' instead of text."
    )
    return_token_ids: bool | None = Field(
        None,
        description="vLLM's: the answer also carries the prompt's token ids "
        "(prompt_token_ids) and each choice's output token ids (token_ids); streamed, the "
        "prompt's with the first chunk and each chunk's new tokens with it.",
    )
    truncate_prompt_tokens: int | None = Field(
        None,
        description="vLLM's: keep only the prompt's last k tokens (k >= 1; -1: as many as the "
        "context holds).",
    )
    user: str | None = None
    # OpenAI's end-user and cache-routing identifiers: accepted, as ``user`` is; a self-hosted
    # server has nothing to do with them.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = Field(None, description="'auto' or 'default' only.")


# The service tiers a self-hosted server honours (OpenAI's flex, priority, scale: none).
SERVICE_TIERS = (None, "auto", "default")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, token ids or a list of token-id lists."
    )
    logprobs: int | None = Field(
        None,
        description="Return the chosen token's logprob and this "
        "many most likely alternatives (0..20).",
    )
    echo: bool = Field(False, description="Prepend the prompt text to the answer.")
    best_of: int | None = Field(None, description="Only None or equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported (must be absent).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(
        description="The conversation; rendered with the tokenizer's chat template."
    )
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(
        None, description="Most likely alternatives per token (0..20); needs logprobs."
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        description="Functions the model may call (rendered by the model's chat template; "
        "the server reads calls back with its --tool_call_parser).",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description="'auto', 'none', 'required' or {'type': 'function', 'function': {'name': "
        "...}} (the last two by constrained decoding).",
    )
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = Field(
        True, description="End the prompt with the template's assistant header (vLLM's)."
    )
    continue_final_message: bool = Field(
        False,
        description="Continue the last message (e.g. a prefilled assistant answer) instead of "
        "starting a new one; needs add_generation_prompt false or left out (vLLM's).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="More variables for the chat template, e.g. enable_thinking (vLLM's)."
    )
    chat_template: str | None = Field(
        None,
        description="A jinja2 chat template for this request in place of the model's (vLLM's); "
        "only where the server runs with --trust_request_chat_template.",
    )
    include_reasoning: bool = Field(
        True,
        description="With the server's --reasoning_parser: return the reasoning as the "
        "message's reasoning_content (false: drop it; vLLM's).",
    )
    echo: bool = Field(
        False,
        description="Prepend the last message's text to the answer when it is the assistant's "
        "(vLLM's; with continue_final_message, the whole message).",
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None,
        description="OpenAI's: reaches the chat template as reasoning_effort (templates that "
        "read it, e.g. gpt-oss's).",
    )
    store: bool | None = None
    metadata: Metadata = None


class MergePart(_Body):
    """One adapter of a merge and its weight."""

    lora_name: str = Field(description="A loaded adapter.")
    weight: float = Field(description="Its update's factor in the sum (may be negative).")


class ResponsesRequest(_Body):
    """OpenAI's body for POST /v1/responses: what a self-hosted model can honour. Fields for
    hosted features (background runs, encrypted reasoning, ...) are accepted at their neutral
    value only; ``jaxlora.server.responses`` says how the rest maps onto a chat."""

    model: str = Field(description="The base model's name or a registered adapter's name.")
    input: str | list[dict[str, Any]] = Field(
        description="A user message's text, or items: messages (role, content text or "
        "input_text / output_text parts), function_call and function_call_output items."
    )
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, description="Tokens to generate at most.")
    temperature: float | None = Field(None, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1].")
    stream: bool = Field(False, description="Stream the response as server-sent events.")
    text: dict[str, Any] | None = Field(
        None, description="{'format': {'type': 'text' | 'json_object' | 'json_schema', ...}}."
    )
    tools: list[dict[str, Any]] | None = Field(
        None, description="Function tools ({'type': 'function', 'name', 'parameters', ...})."
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'auto', 'none', 'required' or {'type': 'function', 'name': ...}."
    )
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(
        None, description="Continue the conversation of a stored response."
    )
    store: bool = Field(True, description="Keep the response for GET and previous_response_id.")
    metadata: Metadata = None
    user: str | None = None
    # OpenAI's end-user and cache-routing identifiers (newer clients send them): accepted and
    # echoed, as the chat's are accepted
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    reasoning: dict[str, Any] | None = Field(
        None, description="{'effort': ...} reaches the chat template as reasoning_effort."
    )
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="'auto': keep the prompt's last tokens that fit the context."
    )
    background: bool | None = Field(None, description="Not supported (must be false).")
    include: list[str] | None = Field(
        None,
        description="['message.output_text.logprobs']: the text's token logprobs (the only "
        "extra output).",
    )
    top_logprobs: int | None = Field(
        None, description="0..20 most likely tokens with each token's logprob (implies them)."
    )
    max_tool_calls: int | None = Field(None, description="Not supported (must be absent).")
    service_tier: str | None = Field(None, description="'auto' or 'default' only.")


class LoadLoraAdapterRequest(_Body):
    """vLLM's body for POST /v1/load_lora_adapter; ``merge`` (instead of ``lora_path``) is
    jaxlora's: the weighted sum of loaded adapters' updates, exactly (PEFT's
    ``add_weighted_adapter(combination_type="cat")``: ranks add)."""

    lora_name: str = Field(description="Name the adapter is served under (the `model` field).")
    lora_path: str | None = Field(
        None,
        description="PEFT adapter directory, absolute or relative to an allowed adapter root.",
    )
    merge: list[MergePart] | None = Field(
        None,
        description="Instead of lora_path: loaded adapters whose weighted updates this one sums "
        "(its rank per module is the sum of theirs, at most the pool's max_rank).",
    )
    load_inplace: bool = Field(
        False,
        description="Replace an adapter of the same name (requests "
        "in flight finish with the old weights).",
    )


class UnloadLoraAdapterRequest(_Body):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = Field(None, description="Accepted for vLLM compatibility; ignored.")


FinishReasonName = Literal["stop", "length"]


class TokenizeRequest(_Body):
    """vLLM's body for POST /tokenize: a prompt, or chat messages rendered with the template."""

    model: str | None = Field(None, description="A served model (all share one tokenizer).")
    prompt: str | None = Field(None, description="Text to tokenize.")
    messages: list[ChatMessage] | None = Field(
        None, description="A conversation, rendered with the chat template (as a chat request)."
    )
    add_special_tokens: bool = Field(True, description="Prepend BOS to a prompt.")
    add_generation_prompt: bool = Field(
        True, description="With messages: end with the template's assistant header."
    )
    continue_final_message: bool = Field(
        False, description="With messages: continue the last message instead."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="With messages: more variables for the chat template."
    )
    chat_template: str | None = Field(
        None,
        description="With messages: a jinja2 chat template in place of the model's "
        "(--trust_request_chat_template only).",
    )


class DetokenizeRequest(_Body):
    """vLLM's body for POST /detokenize."""

    model: str | None = Field(None, description="A served model (all share one tokenizer).")
    tokens: list[int] = Field(description="Token ids to turn into text.")

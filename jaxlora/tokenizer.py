"""Tokenizers: HF ``tokenizer.json`` files, the tiny model's built-in one, streaming detokenisation
and chat templates.

``Tokenizer.from_file`` reads a ``tokenizer.json`` (or a HF model directory) with the
``tokenizers`` library, plus, when present beside it, ``tokenizer_config.json`` (bos / eos / pad
tokens, ``chat_template``) and ``generation_config.json`` (extra EOS ids, as Llama-3 instruct
models list them). Chat templates are jinja2, rendered in jinja2's immutable sandbox (a template
can format text, never run code). Without a template the default is::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

``tiny_tokenizer()`` builds the tiny test model's tokenizer in code (nothing downloaded):
byte-level BPE, so every UTF-8 string round-trips, with at most 512 ids and the special tokens
<pad> <bos> <eos> <|system|> <|user|> <|assistant|>.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxlora.errors import ConfigError, FormatError, RequestError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Where recent transformers save a chat template beside tokenizer_config.json (it wins over the
# config's field, as in transformers), and the processors' older file.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"

CHAT_ROLES = ("system", "user", "assistant")
TINY_VOCAB_SIZE = 512
TINY_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>") + tuple(f"<|{role}|>" for role in CHAT_ROLES)

# Text the tiny tokenizer learns its merges from: enough for common English pieces, so that tokens
# span several bytes (as real tokenizers' do) and streaming has merged tokens to cope with.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it.
Serving many LoRA adapters on one GPU: every request names its adapter, and the server batches
requests for different adapters into the same step. The adapter weights are paged into the GPU
memory when they are needed and evicted when they are not used. The model reads the prompt, then
generates one token at a time until it reaches the end of the text or the maximum number of
tokens. Hello, world! How are you today? I am fine, thank you. What is the time? It is ten past
three. The weather is nice and the sun is shining. There are two cats and three dogs in the house.
def main():
    for index in range(10):
        print(index, "hello")
    return None
Café, naïve, résumé, déjà vu. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Ok, yes, no, maybe.
system: you are a helpful assistant. user: please write a short story. assistant: once upon a time
"""


def load_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding an object; FormatError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_text(path: str) -> str:
    """A UTF-8 text file (a chat template); FormatError naming it if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read the file ({e})") from e


def _token_content(value: Any, field: str, source: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise FormatError(
            f"{source}: field {field!r} must be a token string or "
            f'{{"content": string}}, got {value!r}'
        )
    return value


def _chat_template(value: Any, source: str) -> str | None:
    """HF allows one template or a list of named ones; the one named "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise FormatError(
        f"{source}: field 'chat_template' must be a string or a list holding a "
        "template named 'default'"
    )


def _message_text(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise RequestError(f"messages[{index}]: expected an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise RequestError(f"messages[{index}].role: expected a string, got {role!r}")
    if content is None:
        if role != "assistant":  # (an assistant's tool calls may stand for its content)
            raise RequestError(
                f"messages[{index}].content: expected a string or a list of text parts, got "
                "none (only assistant messages may leave it out)"
            )
        content = ""
    if isinstance(content, list):  # OpenAI content parts: only text parts are understood
        texts = []
        for part in content:
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"messages[{index}].content: only text parts "
                    f"({{'type': 'text', 'text': ...}}) are supported, got {part!r}"
                )
            texts.append(part["text"])
        content = "\n".join(texts)  # (vLLM joins a message's text parts with newlines)
    if not isinstance(content, str):
        raise RequestError(
            f"messages[{index}].content: expected a string or a list of text "
            f"parts, got {type(content).__name__}"
        )
    return role, content


def _template_extras(message: Mapping[str, Any], index: int) -> dict:
    """The tool-calling fields of a message, for templates that render them: an assistant's
    tool_calls (arguments as JSON text, OpenAI's form, and parsed, the form HF templates
    read), a tool result's tool_call_id and name, an earlier answer's reasoning_content
    (Qwen3's templates render it, as vLLM passes it). RequestError naming the field for calls
    that are not OpenAI's objects."""
    extras = {
        k: message[k]
        for k in ("tool_call_id", "name", "reasoning_content")
        if message.get(k) is not None
    }
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, Sequence) or isinstance(calls, str):
            raise RequestError(
                f"messages[{index}].tool_calls: expected a list of calls, got "
                f"{type(calls).__name__}"
            )
        parsed = []
        for k, call in enumerate(calls):
            field = f"messages[{index}].tool_calls[{k}]"
            if not isinstance(call, Mapping):
                raise RequestError(f"{field}: expected an object, got {type(call).__name__}")
            function = call.get("function")
            if not isinstance(function, Mapping):
                raise RequestError(
                    f"{field}.function: expected an object with the function's name and "
                    f"arguments, got {type(function).__name__}"
                )
            function = dict(function)
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    function["arguments"] = json.loads(arguments)
                except (ValueError, RecursionError):  # (not JSON, or past Python's limits)
                    pass  # the text as it was sent
            parsed.append({**call, "function": function})
        extras["tool_calls"] = parsed
    return extras


class IncrementalDecoder:
    """Streams the text of generated tokens one token at a time.

    ``push(token_id)`` returns the text the token adds (possibly "" while a multi-byte character
    is incomplete); ``finish()`` returns what is still held back (an incomplete character at the
    very end, rendered as U+FFFD as a full decode renders it). The concatenation of all returned
    pieces is the text the generated tokens add after the prompt tokens given as context.
    """

    # Prompt tokens kept as left context: enough for decoders that treat a text's first token
    # specially (SentencePiece drops its leading space).
    _CONTEXT_TOKENS = 6

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(t) for t in prompt_ids[-self._CONTEXT_TOKENS :]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # A prompt that ends inside a character (token ids cut mid-character, e.g. an earlier
        # answer's, sent back to be continued): its last tokens stay unread, so that the
        # output's tokens finish the character (as vLLM's DecodeStream, primed with the
        # prompt, does), and the first text handed out is what follows the prompt's text as
        # shown (its unfinished character a U+FFFD), not a slice by that text's length.
        self._shown: str | None = None
        shown = self._decode(self._ids)
        if shown.endswith("\ufffd"):
            while self._read_offset and self._decode(self._ids[: self._read_offset]).endswith(
                "\ufffd"
            ):
                self._read_offset -= 1
            self._shown = shown

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _delta(self, *, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        start = len(prefix_text)
        if self._shown is not None:  # (the first text after a prompt ending mid-character)
            start = len(os.path.commonprefix([self._shown, new_text]))
        if len(new_text) <= start or (new_text.endswith("\ufffd") and not final):
            return ""
        self._shown = None
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[start:]

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        extra_eos_ids: Iterable[int] = (),
        pad_token: str | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
        chat_template_source: str | None = None,
        add_bos_token: bool | None = None,
    ):
        """chat_template_source: where the template came from, for its errors (default:
        source, whose field 'chat_template' held it). add_bos_token: whether ``encode`` puts
        the BOS token first (None: when there is one); templates get ``bos_token`` either
        way, as HF's do."""
        # A tokenizer.json may carry the truncation or padding its last user set (fine-tuning
        # scripts save them); HF's encode turns them off unless asked, so text is never cut or
        # padded here either (nor for llguidance, which reads backend.to_str()).
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        self.chat_template_source = chat_template_source or f"{source}: field 'chat_template'"
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.bos_token_id = self._special_id(bos_token, "bos_token")
        self.add_bos_token = self.bos_token_id is not None and add_bos_token is not False
        self.pad_token_id = self._special_id(pad_token, "pad_token")
        eos_ids = [self._special_id(t, "eos_token") for t in eos_tokens]
        self.eos_token_ids: tuple[int, ...] = tuple(sorted({*eos_ids, *map(int, extra_eos_ids)}))
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.eos_token_id = (
            eos_ids[0] if eos_ids else (self.eos_token_ids[0] if self.eos_token_ids else None)
        )

    def set_chat_template(self, template: str, source: str) -> None:
        """Replaces the chat template (vLLM's --chat-template); compiled now, so that a template
        jinja2 cannot parse is a ConfigError naming ``source`` before any request."""
        _compile_template(template, source)
        self.chat_template, self.chat_template_source = template, source

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise FormatError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return token_id

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a tokenizer.json, or a HF directory holding tokenizer.json (and, beside it,
        optionally tokenizer_config.json and generation_config.json)."""
        path = os.fspath(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FormatError(
                f"{file}: file not found (expected a HF {TOKENIZER_FILE} or a "
                "directory holding one)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the library raises a bare Exception for every parse error
            raise FormatError(f"{file}: not a valid HF {TOKENIZER_FILE} ({e})") from e

        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = load_json_object(config_path) if os.path.isfile(config_path) else {}
        bos = _token_content(config.get("bos_token"), "bos_token", config_path)
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # As HF's encode: BOS where the file's post-processor puts it (Llama's, Gemma's
            # TemplateProcessing), not where it does not (GPT-2-style byte-level files that name
            # a bos_token, e.g. SmolLM2's <|im_start|>).
            add_bos = _post_processor_adds(backend, bos)
        eos = _token_content(config.get("eos_token"), "eos_token", config_path)
        pad = _token_content(config.get("pad_token"), "pad_token", config_path)
        template = _chat_template(config.get("chat_template"), config_path)
        template_source = None
        template_file, template_json = (
            os.path.join(directory, name) for name in (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON_FILE)
        )
        if os.path.isfile(template_file):
            template, template_source = read_text(template_file), template_file
        elif os.path.isfile(template_json):
            template = _chat_template(
                load_json_object(template_json).get("chat_template"), template_json
            )
            template_source = f"{template_json}: field 'chat_template'"

        extra_eos: list[int] = []
        generation_path = os.path.join(directory, GENERATION_CONFIG_FILE)
        if os.path.isfile(generation_path):
            value = load_json_object(generation_path).get("eos_token_id")
            ids = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise FormatError(
                    f"{generation_path}: field 'eos_token_id' must be a token id "
                    f"or a list of token ids, got {value!r}"
                )
            vocab_size = backend.get_vocab_size(with_added_tokens=True)
            if any(t >= vocab_size for t in ids):
                raise FormatError(
                    f"{generation_path}: field 'eos_token_id' {value!r} is outside "
                    f"the vocabulary of {file} (0..{vocab_size - 1})"
                )
            extra_eos = ids
        source = config_path if os.path.isfile(config_path) else file
        tokenizer = cls(
            backend,
            bos_token=bos,
            eos_tokens=(eos,) if eos else (),
            extra_eos_ids=extra_eos,
            pad_token=pad,
            chat_template=template,
            source=source,
            chat_template_source=template_source,
            add_bos_token=add_bos,
        )
        if template is not None:
            try:
                _compile_template(template, tokenizer.chat_template_source)
            except ConfigError as e:
                # Warned, not refused: vLLM loads such a model too (it parses the template when
                # a chat request renders it), its completions need no template, and
                # --chat_template (set_chat_template) may replace it after loading.
                log.warning("%s; chat requests will be refused until it is replaced", e)
        return tokenizer

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (and generation_config.json when
        there are EOS ids besides eos_token) so that ``from_file(directory)`` gives this back."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, TOKENIZER_FILE))
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if set(self.eos_token_ids) - {self.eos_token_id}:
            with open(os.path.join(directory, GENERATION_CONFIG_FILE), "w") as f:
                json.dump({"eos_token_id": list(self.eos_token_ids)}, f, indent=2)

    # ------------------------------------------------------------------ text <-> ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of text, with the BOS token first when add_bos and the model adds one
        (``add_bos_token``).

        The file's own post-processor is not applied (it would add BOS a second time)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(
        self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> IncrementalDecoder:
        return IncrementalDecoder(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        template: str | None = None,
    ) -> str:
        """The prompt text of a chat (OpenAI-style messages: role and content; an assistant's
        ``tool_calls`` and a tool result's ``tool_call_id`` and ``name`` reach the template
        too). ``tools``: OpenAI function definitions for the template to render (only a model's
        own chat template knows how to).

        ``continue_final_message`` (vLLM's and HF's): the text ends right after the last
        message's content, with no end-of-turn after it and no generation prompt, so that the
        model continues that message (a prefilled assistant answer); ``add_generation_prompt``
        (None: unless continuing) must then not be true. ``template_kwargs``: more
        variables for the model's own template (vLLM's ``chat_template_kwargs``, e.g.
        ``enable_thinking``); the default template has none and ignores them. ``template``: a
        request's own jinja2 chat template in place of the tokenizer's (vLLM's request field;
        its faults are the request's: RequestError naming ``chat_template``)."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise RequestError("messages: expected a non-empty list of {role, content} objects")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise RequestError(
                "continue_final_message: cannot continue the final message and add a "
                "generation prompt after it; set add_generation_prompt to false"
            )
        extra = dict(template_kwargs or {})
        taken = sorted(set(extra) & _TEMPLATE_VARIABLES)
        if taken:
            raise RequestError(
                f"chat_template_kwargs.{taken[0]}: the server sets this template variable "
                "itself; expected none of " + ", ".join(sorted(_TEMPLATE_VARIABLES))
            )
        normalised = [_message_text(m, i) for i, m in enumerate(messages)]
        if continue_final_message:
            role, final = normalised[-1]
            if not final.strip():
                raise RequestError(
                    f"messages[{len(messages) - 1}].content: continue_final_message needs a "
                    "final message with text to continue, got an empty one"
                )
            normalised[-1] = (role, final + _CONTINUE_TAG)
        text = self._render_chat(
            messages, normalised, add_generation_prompt, tools, extra, template
        )
        if continue_final_message:
            text = _cut_after_final_message(text, final, len(messages) - 1)
        return text

    def _render_chat(
        self, messages, normalised, add_generation_prompt, tools, extra, request_template=None
    ) -> str:
        from_request = request_template is not None
        if not from_request and self.chat_template is None:
            if tools:
                raise RequestError(
                    "tools: the default chat template cannot render tools; serve a model whose "
                    "tokenizer_config.json has a chat template that does"
                )
            parts = []
            for index, (role, content) in enumerate(normalised):
                if role not in CHAT_ROLES:
                    raise RequestError(
                        f"messages[{index}].role: {role!r} is not one of "
                        f"{list(CHAT_ROLES)} (the default chat template)"
                    )
                parts.append(f"<|{role}|>\n{content}\n")
            if add_generation_prompt:
                parts.append("<|assistant|>\n")
            return "".join(parts)
        source = "chat_template" if from_request else self.chat_template_source
        try:
            template = _compile_template(
                request_template if from_request else self.chat_template, source
            )
        except ConfigError as e:
            # A request's own template: its fault. The model's: a RequestError too, as vLLM
            # answers both with a 400 naming the template error, not a 500 that clients (the
            # OpenAI SDK) retry although it fails the same way every time.
            raise RequestError(str(e)) from None
        rendered_messages = [
            {"role": r, "content": c, **_template_extras(m, i)}
            for i, ((r, c), m) in enumerate(zip(normalised, messages, strict=True))
        ]
        try:
            return template.render(
                messages=rendered_messages,
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except _TemplateRaised as e:
            if from_request:
                raise RequestError(f"chat_template: {e}") from e
            raise RequestError(f"chat template ({source}): {e}") from e
        except Exception as e:  # a broken template fails at render time too
            if from_request:
                raise RequestError(
                    f"chat_template: failed to render ({type(e).__name__}: {e})"
                ) from e
            if extra:  # (or the request's own variables broke it)
                raise RequestError(
                    f"chat_template_kwargs: the chat template ({source}) "
                    f"failed to render with {sorted(extra)} ({type(e).__name__}: {e})"
                ) from e
            # (the model's template: a 400 as vLLM's, for the reason a parse error is)
            raise RequestError(
                f"{source}: the chat template failed to render ({type(e).__name__}: {e})"
            ) from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        template: str | None = None,
    ) -> list[int]:
        """Prompt ids of a chat; BOS is added unless the template already wrote it."""
        text = self.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            template_kwargs=template_kwargs,
            template=template,
        )
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_bos=not has_bos)


# The variables apply_chat_template gives a template itself.
_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)


# Appended to the final message's text for continue_final_message, so that the cut is where
# the template wrote that message's end (transformers' tag): not where the same text comes
# again after it (a final message "end" and a template's "<|im_end|>").
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _post_processor_adds(backend: tokenizers.Tokenizer, bos: str | None) -> bool:
    """Whether the tokenizer's post-processor puts the token ``bos`` first."""
    bos_id = None if bos is None else backend.token_to_id(bos)
    if bos_id is None:
        return False
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and plain[:1] != [bos_id]


def _cut_after_final_message(text: str, final: str, index: int) -> str:
    """The chat rendered with ``_CONTINUE_TAG`` after the final message's text, cut before the
    tag (HF's rule: a template that strips the message strips the tag's space too, and then
    the whitespace before the tag, the message's trailing whitespace, goes as well)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise RequestError(
            f"messages[{index}].content: continue_final_message: the chat template does not "
            "write the final message's text into the prompt"
        )
    at = text.rindex(tag)
    if text.startswith(_CONTINUE_TAG, at):  # the template kept the message's whitespace
        return text[:at]
    return text[:at].rstrip()


class _TemplateRaised(Exception):
    """A template's own raise_exception(...) call (e.g. roles that do not alternate)."""


def _raise_from_template(message: str):
    raise _TemplateRaised(message)


@functools.lru_cache(maxsize=16)
def _compile_template(source_text: str, source: str):
    try:
        import jinja2.sandbox
    except ImportError as e:
        raise ConfigError(
            f"{source}: a chat template, which needs the jinja2 package (pip install jinja2)"
        ) from e
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        """HF's {% generation %} ... {% endgeneration %} (it marks the assistant's tokens for
        training masks): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render", [], [], lineno=lineno)
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    # HF's renderer: its extensions ({% break %} / {% continue %}, {% generation %}) and helpers.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationTag],
    )

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_from_template
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source_text)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{source}: not a valid jinja2 template ({e})") from e


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    return backend.to_str()


def tiny_tokenizer() -> Tokenizer:
    """The tiny model's tokenizer: byte-level BPE, <= 512 ids, specials at ids 0..5."""
    backend = tokenizers.Tokenizer.from_str(_tiny_tokenizer_json())
    return Tokenizer(
        backend,
        bos_token="<bos>",
        eos_tokens=("<eos>",),
        pad_token="<pad>",
        source="tiny_tokenizer()",
    )

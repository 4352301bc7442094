"""Structured outputs (constrained decoding): every token a request samples keeps its text a
prefix of something a JSON schema, a regular expression, a list of choices or a grammar accepts.

The matching is llguidance's (an Earley parser over a lexer, with the tokenizer's token trie:
tens of microseconds a mask for JSON schemas). Per step the engine asks each constrained row's
matcher for the set of tokens allowed next, as a bitmask of one bit a token (``TokenMasks``):
(B, ceil(V / 32)) int32 words, bit ``t % 32`` of word ``t // 32`` set when token t is allowed.
The sampler sets every other token's logit to -inf before temperature, filters and argmax;
logprobs stay the model's own. The matcher then consumes the token the row got; once the
grammar can take nothing more the request finishes (reason ``stop``).

A mask needs the row's previous token on the host. Under async scheduling that token is still
being sampled when the next step is dispatched, so an iteration with a constrained row
dispatches its model steps first, reads the previous tokens while the device runs them, and
only then computes the masks and dispatches the samplers (``jaxlora.engine.engine``, policy
6): the row decodes every iteration.

After reasoning (``ReasoningTokens``, vLLM's structured outputs beside a reasoning parser): a
reasoning model's answer thinks first, freely, and only what follows the tag that closes its
reasoning is constrained. ``GrammarGate`` wraps a request's matcher: it lets every token through
until the output's tail spells the closing tag's tokens, then hands the rest to the grammar.
For a model whose answer may or may not open a reasoning block (qwen3), the answer's first
tokens may spell the opening tag (then it reasons until the closing one) or start the
grammar's output; both are allowed, token by token, until one of them is taken. The tags are
matched as token ids (reasoning models have them as single special tokens); an answer that
spells a tag with other tokens is not seen to open or close its reasoning.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from collections.abc import Sequence

import numpy as np

from jaxlora.errors import RequestError

KINDS = ("json", "regex", "choice", "grammar")
# A JSON schema accepting any JSON object (OpenAI's response_format {"type": "json_object"}).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20


def _llguidance():
    # (imported when first used: only constrained requests need it)
    import llguidance

    return llguidance


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match.

    kind "json": spec is a JSON schema (its JSON text, or a dict); "regex": a regular expression
    (Rust regex syntax) the whole output matches; "choice": a list of strings, the output is one
    of them; "grammar": a Lark grammar (or llama.cpp's GBNF), the output is a sentence of it.
    ``field`` names the request field it came from, for error messages. compact (json only):
    no whitespace between tokens (vLLM's disable_any_whitespace); otherwise any amount, which
    a weak model may fill its output with.
    """

    kind: str
    spec: str | tuple[str, ...]
    field: str = "structured_output"
    compact: bool = False

    def __post_init__(self):
        def fail(expected: str, got):
            raise RequestError(f"{self.field}: expected {expected}, got {got!r}")

        if self.kind not in KINDS:
            fail(f"a kind among {list(KINDS)}", self.kind)
        if not isinstance(self.compact, bool):
            fail("compact to be a bool", self.compact)
        spec = self.spec
        if self.kind == "json" and isinstance(spec, dict):
            try:
                spec = json.dumps(spec)
            except RecursionError:
                raise RequestError(f"{self.field}: the schema is nested too deeply") from None
            except (TypeError, ValueError) as e:
                raise RequestError(f"{self.field}: the schema is not JSON ({e})") from None
        if self.kind == "choice":
            if (
                not isinstance(spec, (list, tuple))
                or not 1 <= len(spec) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in spec)
            ):
                fail(f"a list of 1..{MAX_CHOICES} non-empty strings", spec)
            spec = tuple(spec)
        elif not isinstance(spec, str) or not spec.strip():
            fail("a non-empty string" + (" or a JSON object" if self.kind == "json" else ""), spec)
        elif len(spec) > MAX_SPEC_CHARS:
            fail(f"at most {MAX_SPEC_CHARS} characters", f"{len(spec)} characters")
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "_grammar", self._compile())

    def _compile(self) -> str:
        llg = self._llguidance_or_fail()
        if self.kind == "json":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as e:
                raise RequestError(f"{self.field}: the schema is not valid JSON ({e})") from None
            except RecursionError:
                raise RequestError(f"{self.field}: the schema is nested too deeply") from None
            if not isinstance(schema, (dict, bool)):
                raise RequestError(
                    f"{self.field}: expected a JSON schema (an object), got {self.spec[:200]!r}"
                )
            # (llguidance applies options to an object schema only: true is {}; false fails)
            compact = self.compact and schema is not False
            try:
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    "{}" if schema is True else self.spec,
                    overrides={"whitespace_flexible": False} if compact else None,
                )
            except ValueError as e:
                raise RequestError(f"{self.field}: not a usable JSON schema ({e})") from None
        elif self.kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(self.spec)
        elif self.kind == "choice":
            grammar = llg.grammar_from("choice", list(self.spec))
        else:
            try:
                grammar = llg.grammar_from("grammar", self.spec)
            except ValueError as e:
                raise RequestError(f"{self.field}: not a Lark or GBNF grammar ({e})") from None
        problem = llg.LLMatcher.validate_grammar(grammar)
        if problem:
            raise RequestError(f"{self.field}: the {self.kind} does not compile: {problem}")
        return grammar

    def _llguidance_or_fail(self):
        try:
            return _llguidance()
        except ImportError:
            raise RequestError(
                f"{self.field}: structured outputs need the llguidance package "
                "(pip install llguidance)"
            ) from None

    @property
    def grammar(self) -> str:
        """The llguidance grammar (compiled and checked at construction)."""
        return self._grammar

    @classmethod
    def json_object(cls, field: str = "structured_output", compact: bool = False):
        return cls("json", JSON_OBJECT_SCHEMA, field, compact)


@dataclasses.dataclass(frozen=True)
class ReasoningTokens:
    """Where a structured output's grammar starts: after the answer's reasoning.

    end: the token ids of the tag that closes the reasoning; the grammar constrains every token
    after the output's first occurrence of them. start: those of the tag that opens it, for an
    answer that may open a reasoning block or not (qwen3): one that opens with them reasons
    until ``end``, one that does not follows the grammar from its first token (a token that
    both the tag and the grammar allow is read as the tag's). Empty: the answer starts inside
    the reasoning (its prompt opened it, deepseek_r1).
    """

    end: tuple[int, ...]
    start: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("end", "start"):
            tokens = getattr(self, name)
            if not isinstance(tokens, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0
                for t in tokens
            ):
                raise RequestError(
                    f"reasoning_tokens.{name}: expected a list of token ids >= 0, got {tokens!r}"
                )
            object.__setattr__(self, name, tuple(int(t) for t in tokens))
        if not self.end:
            raise RequestError("reasoning_tokens.end: expected at least one token id, got none")

    def check_vocab(self, vocab_size: int) -> None:
        for name in ("end", "start"):
            for token in getattr(self, name):
                if token >= vocab_size:
                    raise RequestError(
                        f"reasoning_tokens.{name}: token id {token} is outside the vocabulary "
                        f"(expected 0..{vocab_size - 1})"
                    )


class GrammarGate:
    """A request's matcher and where its grammar starts (``ReasoningTokens``; None: at the
    first token). The engine asks ``mask_source`` for each step's mask and gives ``advance``
    each token the request gets."""

    OPENING, REASONING, GRAMMAR = "opening", "reasoning", "grammar"

    def __init__(self, matcher, reasoning: ReasoningTokens | None = None):
        self.matcher = matcher
        self.reasoning = reasoning
        if reasoning is None:
            self.phase = self.GRAMMAR
        else:
            self.phase = self.OPENING if reasoning.start else self.REASONING
        self._opened = 0  # tokens of the opening tag the answer opened with
        self._grammar_took_opening = True  # the matcher consumed those tokens too
        self._tail: list[int] = []  # the reasoning's last tokens (for the closing tag)

    def mask_source(self):
        """(matcher, extra token): the step's mask is the matcher's (every token where the
        matcher is None; no token where it is False) with the extra token's bit set (the
        opening tag's next token; None: no extra)."""
        if self.phase == self.GRAMMAR:
            return self.matcher, None
        if self.phase == self.REASONING:
            return None, None
        matcher = self.matcher if self._grammar_took_opening else False
        return matcher, self.reasoning.start[self._opened]

    def advance(self, token: int) -> bool:
        """Takes the request's next token; False if the grammar refuses it."""
        if self.phase == self.GRAMMAR:
            return self.matcher.consume_token(token)
        if self.phase == self.REASONING:
            end = self.reasoning.end
            self._tail = (self._tail + [token])[-len(end) :]
            if tuple(self._tail) == end:
                self.phase = self.GRAMMAR
            return True
        start = self.reasoning.start
        if token == start[self._opened]:
            self._opened += 1
            if self._grammar_took_opening:
                self._grammar_took_opening = self.matcher.try_consume_tokens([token]) == 1
            if self._opened == len(start):
                self.matcher.reset()  # (the grammar starts after the reasoning)
                self.phase = self.REASONING
            return True
        self.phase = self.GRAMMAR
        return self._grammar_took_opening and self.matcher.consume_token(token)

    def is_stopped(self) -> bool:
        """Whether the grammar can take nothing more."""
        return self.phase == self.GRAMMAR and self.matcher.is_stopped()

    def get_error(self) -> str:
        if self.phase == self.GRAMMAR and not self._grammar_took_opening:
            return "the answer left the opening tag of its reasoning half spelt"
        return self.matcher.get_error()


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def token_mask(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    """(words,) int32: one row's bitmask with exactly ``tokens`` allowed."""
    bits = np.zeros(mask_words(vocab_size) * 32, np.uint8)
    bits[np.asarray(tokens, np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


class TokenMasks:
    """The engine's side of structured outputs: the tokenizer as llguidance sees it (built once,
    over the model's whole vocabulary: ids past the tokenizer's are never allowed), a matcher
    per constrained request, and the step's bitmask of the allowed tokens.

    Compiling a grammar against the vocabulary takes up to seconds for a large schema (its
    lexer), so the last ``KEPT_GRAMMARS`` grammars' compiled matchers are kept (fewer where
    their grammars pass ``KEPT_GRAMMAR_CHARS`` together: some hundred bytes of memory a
    character; the last one is always kept), with their first mask computed: a request's
    matcher is a copy of its grammar's (microseconds: the n choices of a request, and every
    request of an application's one schema, compile it once), and ``prepare`` compiles one
    ahead, off the caller's event loop."""

    KEPT_GRAMMARS = 32
    KEPT_GRAMMAR_CHARS = 1 << 20

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        self.vocab_size = vocab_size
        self._tokenizer = llg.LLTokenizer(
            tokenizer.backend.to_str(),
            n_vocab=vocab_size,
            eos_token=sorted(eos_ids) or None,
        )
        self._executor = llg.LLExecutor()
        self._lock = threading.Lock()
        # grammar -> its compiled matcher (never advanced: requests get copies), oldest first
        self._compiled: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._compiled_lock = threading.Lock()

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher for one request; RequestError (naming the request field) if the
        grammar does not work with this tokenizer."""
        return self._compiled_matcher(structured).deep_copy()

    def prepare(self, structured: StructuredOutput) -> None:
        """Compiles the grammar against the vocabulary now (a thread's work for a large
        schema), for the requests that ask ``matcher`` for it next; RequestError as there."""
        self._compiled_matcher(structured)

    def _compiled_matcher(self, structured: StructuredOutput):
        grammar = structured.grammar
        with self._compiled_lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        compiled = _llguidance().LLMatcher(self._tokenizer, grammar, log_level=0)
        if not compiled.is_error():
            compiled.compute_bitmask()  # (its lexer's first states, which the copies keep)
        if compiled.is_error():
            raise RequestError(f"{structured.field}: {compiled.get_error()}")
        with self._compiled_lock:
            self._compiled[grammar] = compiled
            chars = sum(map(len, self._compiled))
            while len(self._compiled) > 1 and (
                len(self._compiled) > self.KEPT_GRAMMARS or chars > self.KEPT_GRAMMAR_CHARS
            ):
                dropped, _ = self._compiled.popitem(last=False)
                chars -= len(dropped)
        return compiled

    def bitmask(self, rows: Sequence[tuple[object, int]], batch_size: int) -> np.ndarray:
        """(batch_size, words) int32: each (matcher, row)'s allowed tokens; other rows allow
        every token."""
        masks = np.full((batch_size, mask_words(self.vocab_size)), -1, np.int32)
        if rows:
            with self._lock:
                self._executor.unsafe_compute_mask_ptr(
                    [(matcher, row) for matcher, row in rows],
                    masks.ctypes.data,
                    masks.shape[1] * 4,
                    batch_size,
                )
        return masks


def allowed_tokens(masks: np.ndarray, vocab_size: int) -> np.ndarray:
    """(B, V) bool from (B, words) bitmasks (the numpy twin of ``sampling.unpack_token_mask``)."""
    bits = np.unpackbits(masks.view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


__all__ = [
    "JSON_OBJECT_SCHEMA",
    "KINDS",
    "GrammarGate",
    "ReasoningTokens",
    "StructuredOutput",
    "TokenMasks",
    "allowed_tokens",
    "mask_words",
    "token_mask",
]

"""Reasoning in a chat model's answer, read apart from its content (vLLM's
``--reasoning-parser``): the message's ``reasoning_content`` and ``content``.

``deepseek_r1``: the reasoning runs up to ``</think>`` (DeepSeek-R1 and its Llama / Qwen
distills, whose chat template opens the ``<think>`` block in the prompt; one the answer opens
itself is dropped too). An answer without ``</think>`` is all reasoning, as vLLM reads it.
``qwen3``: the reasoning is a ``<think>...</think>`` block at the start of the answer (Qwen3's
thinking mode); an answer that does not open with one, or never closes it, is all content.

``ReasoningStream`` does the same on streamed text, handing out each piece as reasoning or
content as soon as it is known: a piece that may be the start of a tag is held until the next.
Streamed, a ``qwen3`` block that never closes has gone out as reasoning.

A structured output (or a forced tool call) constrains the content only: ``grammar_start``
gives the engine the tags' token ids (``jaxlora.structured_output.ReasoningTokens``), and the
grammar starts after the closing tag (``qwen3``: or at the first token of an answer that does
not open a block). A prompt that ends with the closing tag (Qwen3's template with
``enable_thinking`` false, or a prefilled answer past its reasoning) has closed the reasoning
itself: the whole answer is content, constrained from its first token. One that ends with the
opening tag (Qwen3-2507 thinking's and Qwen3.5's templates) has opened it: the answer is read
as deepseek_r1 reads it, from inside the reasoning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxlora.structured_output import ReasoningTokens


@dataclasses.dataclass(frozen=True)
class ReasoningFormat:
    start: str  # the tag that may open the answer's reasoning
    end: str  # the tag that ends it
    # The answer opens inside the reasoning (the prompt opened it): without ``end`` all of it
    # is reasoning. Otherwise the answer must open with ``start``, or it is all content.
    opened_by_prompt: bool


REASONING_PARSERS = {
    "deepseek_r1": ReasoningFormat("<think>", "</think>", opened_by_prompt=True),
    "qwen3": ReasoningFormat("<think>", "</think>", opened_by_prompt=False),
}


def split_reasoning(text: str, fmt: ReasoningFormat) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; None for an empty part."""
    stripped = text.lstrip()
    if stripped.startswith(fmt.start):
        body = stripped[len(fmt.start) :]
    elif fmt.opened_by_prompt:
        body = text
    else:
        return None, text or None
    end = body.find(fmt.end)
    if end < 0:
        return (body or None, None) if fmt.opened_by_prompt else (None, text or None)
    return body[:end] or None, body[end + len(fmt.end) :] or None


class ReasoningStream:
    """``split_reasoning`` on streamed text: ``push(delta)`` returns (reasoning, content) to
    stream now; ``finish()`` what was held back once the answer is complete."""

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self._held = ""  # text that may be (the start of) a tag
        self._opening = True  # the answer's start is still to be read
        self._reasoning = fmt.opened_by_prompt  # inside the reasoning
        self._done = False  # past the reasoning: everything is content

    def push(self, delta: str) -> tuple[str, str]:
        if self._done:
            return "", delta
        text = self._held + delta
        self._held = ""
        if self._opening:
            stripped = text.lstrip()
            if self.fmt.start.startswith(stripped):  # (or nothing but whitespace yet)
                self._held = text
                return "", ""
            self._opening = False
            if stripped.startswith(self.fmt.start):
                self._reasoning = True
                text = stripped[len(self.fmt.start) :]
            elif not self._reasoning:
                self._done = True
                return "", text
        end = text.find(self.fmt.end)
        if end >= 0:
            self._done = True
            return text[:end], text[end + len(self.fmt.end) :]
        keep = _partial_suffix(text, self.fmt.end)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._done:
            return "", held
        if self._opening:  # (whitespace, or part of the opening tag, and nothing more)
            return (held, "") if self.fmt.opened_by_prompt else ("", held)
        return held, ""


def grammar_start(fmt: ReasoningFormat, tokenizer) -> ReasoningTokens:
    """The tags' token ids (no opening tag where the prompt opens the reasoning): where a
    structured output's grammar starts, and what ``reasoning_token_count`` reads."""
    end = tokenizer.encode(fmt.end, add_bos=False)
    start = () if fmt.opened_by_prompt else tokenizer.encode(fmt.start, add_bos=False)
    return ReasoningTokens(end=tuple(end), start=tuple(start))


def prompt_closes_reasoning(
    fmt: ReasoningFormat, tags: ReasoningTokens, tokenizer, prompt_ids: Sequence[int]
) -> bool:
    """Whether the prompt ends with the closing tag (and whitespace): the answer is then all
    content."""
    return _prompt_ends_with(fmt.end, len(tags.end), tokenizer, prompt_ids)


def prompt_opens_reasoning(
    fmt: ReasoningFormat, tags: ReasoningTokens, tokenizer, prompt_ids: Sequence[int]
) -> bool:
    """Whether the prompt ends with the opening tag (and whitespace; ``tags`` the format's
    own, grammar_start's, with the opening tag's ids): the answer starts inside the reasoning
    (Qwen3-2507 thinking and Qwen3.5 templates open the block in the prompt, a prefilled
    answer may too), as deepseek_r1 reads every answer."""
    return _prompt_ends_with(fmt.start, len(tags.start), tokenizer, prompt_ids)


def _prompt_ends_with(tag: str, tag_tokens: int, tokenizer, prompt_ids: Sequence[int]) -> bool:
    # (the tag's tokens and a few of whitespace after it are enough to read)
    tail = prompt_ids[-(tag_tokens + 8) :]
    return tokenizer.decode(tail, skip_special_tokens=False).rstrip().endswith(tag)


def reasoning_token_count(tags: ReasoningTokens, tokenizer, output_ids: Sequence[int]) -> int:
    """How many of an answer's tokens are its reasoning (the tags' included), by the tags'
    token ids (``grammar_start``): up to the first closing tag; an answer that never closes it
    is all reasoning where the prompt opened it (deepseek_r1: no opening tag), none where it had
    to open a block itself and did not (qwen3: after any blank tokens, the opening tag's)."""
    ids = tuple(output_ids)
    if tags.start:
        # (the text's reading: whitespace may come before the opening tag)
        blank = 0
        while blank < len(ids) and not tokenizer.decode(ids[: blank + 1]).strip():
            blank += 1
        if ids[blank : blank + len(tags.start)] != tags.start:
            return 0
    end = tags.end
    for at in range(len(ids) - len(end) + 1):
        if ids[at : at + len(end)] == end:
            return at + len(end)
    return 0 if tags.start else len(ids)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


__all__ = [
    "REASONING_PARSERS",
    "ReasoningFormat",
    "ReasoningStream",
    "grammar_start",
    "prompt_closes_reasoning",
    "prompt_opens_reasoning",
    "reasoning_token_count",
    "split_reasoning",
]

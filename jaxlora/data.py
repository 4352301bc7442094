"""Datasets for LoRA training and offline evaluation: JSONL records -> token-id examples.

One record per line, either

    {"adapter": "name", "prompt": ..., "completion": ...}   the completion is scored / learnt
    {"adapter": "name", "text": ...}                        every token after the first is

where prompt / completion / text are strings (encoded with the tokenizer: the prompt and the text
with BOS, the completion without) or lists of token ids (taken as they are). ``"adapter": null``
(or "") means the base model alone. Prompt and completion are encoded separately, as evaluation
harnesses do, so the scored tokens are exactly the completion's own tokenization.

An ``Example`` is a prompt (context, never scored) and a completion (scored); a text record is
the prompt ``ids[:1]`` and the completion ``ids[1:]``. The model sees ``(prompt + completion)[:-1]``
and predicts ``(prompt + completion)[1:]``; only the completion positions count.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from jaxlora.errors import ConfigError, FormatError


class Tokenizer(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Example:
    """One scored sequence. adapter None = base model; source names the file and line."""

    adapter: str | None
    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    source: str = ""

    def __post_init__(self):
        # Token ids as tuples of ints (lists would not concatenate with tuples), and at least
        # one of each: with no prompt, arrays() would mask all but the last completion token.
        for field in ("prompt", "completion"):
            value = getattr(self, field)
            try:
                ids = tuple(operator.index(t) for t in value)
            except TypeError:
                ids = None
            if ids is None or any(t < 0 for t in ids):
                raise FormatError(
                    f"{self.source or 'example'}: field {field!r} must be a sequence of token "
                    f"ids (ints >= 0); got {value!r:.100}"
                )
            if not ids:
                raise FormatError(
                    f"{self.source or 'example'}: field {field!r} has no tokens; expected at "
                    "least one"
                    + (
                        " (the first completion token is predicted from it)"
                        if field == "prompt"
                        else ""
                    )
                )
            object.__setattr__(self, field, ids)

    @property
    def length(self) -> int:
        """Positions the model is run on: the whole sequence but its last token."""
        return len(self.prompt) + len(self.completion) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, loss_mask), each of shape (length,)."""
        ids = np.asarray(self.prompt + self.completion, np.int32)
        mask = np.zeros(self.length, bool)
        mask[len(self.prompt) - 1 :] = True
        return ids[:-1], ids[1:], mask


def _token_ids(value, what: str, source: str, vocab_size: int | None) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise FormatError(
            f"{source}: field {what!r} must be a string or a list of token ids "
            f"(ints); got {type(value).__name__}"
        )
    if vocab_size is not None:
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise FormatError(
                f"{source}: field {what!r} has token id {bad[0]}; expected ids in "
                f"[0, {vocab_size}) (the model's vocab_size)"
            )
    return tuple(value)


def _encode(
    value,
    what: str,
    source: str,
    tokenizer: Tokenizer | None,
    add_bos: bool,
    vocab_size: int | None,
) -> tuple[int, ...]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ConfigError(
                f"{source}: field {what!r} is text but no tokenizer was given "
                "(pass one, or give token ids as a list of ints)"
            )
        value = list(tokenizer.encode(value, add_bos=add_bos))
    return _token_ids(value, what, source, vocab_size)


def make_example(
    prompt,
    completion,
    *,
    adapter: str | None = None,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    source: str = "example",
) -> Example:
    """An Example from text (encoded: the prompt with BOS) or token ids (taken as given)."""
    prompt_ids = _encode(prompt, "prompt", source, tokenizer, True, vocab_size)
    completion_ids = _encode(completion, "completion", source, tokenizer, False, vocab_size)
    if not prompt_ids:
        raise FormatError(
            f"{source}: field 'prompt' has no tokens; expected at least one (the "
            "first completion token needs a token before it to be predicted from)"
        )
    if not completion_ids:
        raise FormatError(f"{source}: field 'completion' has no tokens; expected at least one")
    return Example(
        adapter=adapter or None, prompt=prompt_ids, completion=completion_ids, source=source
    )


def example_from_record(
    record,
    source: str,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    default_adapter: str | None = None,
    require_adapter: bool = False,
) -> Example:
    if not isinstance(record, dict):
        raise FormatError(f"{source}: expected a JSON object, got {type(record).__name__}")
    if "adapter" in record:
        adapter = record["adapter"]
        if adapter is not None and not isinstance(adapter, str):
            raise FormatError(
                f"{source}: field 'adapter' must be a string or null; got {type(adapter).__name__}"
            )
    elif require_adapter:
        raise FormatError(
            f"{source}: missing field 'adapter' (the adapter name; null for the base model)"
        )
    else:
        adapter = default_adapter
    if "text" in record:
        if "prompt" in record or "completion" in record:
            raise FormatError(f"{source}: give either 'text' or 'prompt' + 'completion', not both")
        ids = _encode(record["text"], "text", source, tokenizer, True, vocab_size)
        if len(ids) < 2:
            raise FormatError(
                f"{source}: field 'text' has {len(ids)} token(s); expected at "
                "least 2 (the first one is only context)"
            )
        return Example(adapter=adapter or None, prompt=ids[:1], completion=ids[1:], source=source)
    for field in ("prompt", "completion"):
        if field not in record:
            raise FormatError(
                f"{source}: missing field {field!r} (expected 'prompt' and 'completion', or 'text')"
            )
    return make_example(
        record["prompt"],
        record["completion"],
        adapter=adapter,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        source=source,
    )


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yields (\"file:line\", parsed JSON) for every non-blank line."""
    path = os.fspath(path)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first
        # record; surrogateescape: a byte that is not UTF-8 is reported with its line below
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found (expected a JSONL dataset)") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot read the JSONL dataset ({e.strerror})") from e
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise FormatError(
                    f"{source}: not valid UTF-8 (byte 0x{ord(line[e.start]) - 0xDC00:02x} at "
                    f"column {e.start + 1}); expected a UTF-8 encoded JSONL file"
                ) from None
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(
                    f"{source}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None


def load_examples(
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    default_adapter: str | None = None,
    require_adapter: bool = False,
    max_length: int | None = None,
) -> list[Example]:
    """Reads a JSONL dataset. max_length: the longest sequence allowed (FormatError beyond)."""
    examples = []
    for source, record in read_jsonl(path):
        example = example_from_record(
            record,
            source,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            default_adapter=default_adapter,
            require_adapter=require_adapter,
        )
        check_length(example, max_length)
        examples.append(example)
    if not examples:
        raise FormatError(f"{os.fspath(path)}: no records (expected one JSON object per line)")
    return examples


def check_length(example: Example, max_length: int | None) -> None:
    if max_length is not None and example.length > max_length:
        raise FormatError(
            f"{example.source}: the sequence has {example.length + 1} tokens "
            f"(prompt {len(example.prompt)} + completion "
            f"{len(example.completion)}); expected at most {max_length + 1} "
            "(raise the maximum sequence length or shorten the record)"
        )


def bucket_length(length: int, *, min_bucket: int, max_length: int) -> int:
    """The padded length of a sequence: the next power of two >= length, within bounds."""
    bucket = min_bucket
    while bucket < length:
        bucket *= 2
    return min(bucket, max(max_length, length))


def pad_rows(examples: Sequence[Example | None], length: int) -> dict[str, np.ndarray]:
    """Right-padded (rows, length) arrays; None rows are padding (all masked)."""
    rows = len(examples)
    tokens = np.zeros((rows, length), np.int32)
    targets = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), bool)
    valid = np.zeros((rows, length), bool)
    for i, example in enumerate(examples):
        if example is None:
            continue
        inputs, target, mask = example.arrays()
        n = len(inputs)
        if n > length:
            raise ValueError(f"{example.source}: {n} positions do not fit in rows of {length}")
        tokens[i, :n] = inputs
        targets[i, :n] = target
        loss_mask[i, :n] = mask
        valid[i, :n] = True
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "valid": valid}


def group_by_adapter(examples: Iterable[Example]) -> dict[str | None, list[Example]]:
    """Examples per adapter name, in order of first appearance."""
    groups: dict[str | None, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.adapter, []).append(example)
    return groups

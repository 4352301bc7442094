"""Bad words (vLLM's ``bad_words``): token sequences a request's output never completes.

A bad word is tokenized twice, as vLLM does: as written (with its leading whitespace stripped)
and with one leading space, the form it takes inside a text for byte-level BPE and
SentencePiece tokenizers; the second form is kept unless it ends with the first (a space token
before the word, which the first form's ban already catches: bans match the output's tail).
vLLM keeps it only when it has as many tokens as the first, so a word that a space merges
into fewer tokens (" the" one token, "the" two) is banned here and not there. Each step, a
sequence of one token is banned outright, and a longer one bans its last token where the
output so far ends with the rest of it. Only the output counts (the prompt may end with a bad
word's first tokens), as in vLLM.

The bans travel as the sampler's token bitmask (``sampling.unpack_token_mask``), the one
structured outputs use: a row with bad words is masked in every step, and under async
scheduling, where a form of several tokens needs the row's previous token, its sampler waits
for it, as a constrained row's does (engine policy 6); bans of one-token forms only are the
same every step and wait for nothing. A ban that would leave a structured output's grammar no
token is not applied: the grammar decides (its output must match), and the bad word may then
appear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.errors import RequestError


def bad_word_token_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of ``words`` (each as written and with a leading space; see the
    module docstring), without duplicates."""
    sequences: list[tuple[int, ...]] = []
    for index, word in enumerate(words):
        bare = word.lstrip()
        if not bare:
            raise RequestError(f"bad_words[{index}]: expected a word, got {word!r}")
        plain = tuple(tokenizer.encode(bare, add_bos=False))
        spaced = tuple(tokenizer.encode(" " + bare, add_bos=False))
        covered = len(spaced) >= len(plain) and spaced[len(spaced) - len(plain) :] == plain
        for form in (plain,) if covered else (plain, spaced):
            if form and form not in sequences:
                sequences.append(form)
    return tuple(sequences)


class BadWords:
    """The token sequences a request must not complete (``bad_word_token_ids``)."""

    def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int):
        self.always = sorted({int(s[0]) for s in sequences if len(s) == 1})
        # Keyed by the tokens before the banned last one.
        self.after: dict[tuple[int, ...], set[int]] = {}
        for s in sequences:
            if len(s) > 1:
                self.after.setdefault(tuple(int(t) for t in s[:-1]), set()).add(int(s[-1]))
        self.longest_prefix = max((len(p) for p in self.after), default=0)
        for s in sequences:
            for token in s:
                if not 0 <= token < vocab_size:
                    raise RequestError(
                        f"bad_words: token id {token} is outside the vocabulary "
                        f"(expected 0..{vocab_size - 1})"
                    )

    @property
    def static(self) -> bool:
        """Whether the bans are the same after any output (every form one token): then they
        need no previous token, and an async row does not wait for it."""
        return not self.after

    def banned(self, output_ids: Sequence[int]) -> list[int]:
        """The tokens banned after ``output_ids``."""
        banned = set(self.always)
        for length in range(1, min(self.longest_prefix, len(output_ids)) + 1):
            tail = tuple(output_ids[-length:])
            banned |= self.after.get(tail, set())
        return sorted(banned)


def clear_tokens(mask: np.ndarray, tokens: Sequence[int]) -> None:
    """Clears ``tokens``' bits in one row of a (words,) int32 bitmask, in place (only the words
    that hold them are touched)."""
    if not tokens:
        return
    tokens = np.asarray(tokens, np.int64)
    bits = mask.view(np.uint32)
    np.bitwise_and.at(bits, tokens >> 5, ~(np.uint32(1) << (tokens & 31).astype(np.uint32)))


def apply_bans(mask: np.ndarray, tokens: Sequence[int], vocab_size: int) -> bool:
    """Clears ``tokens`` from one row's bitmask unless that leaves no token of the vocabulary
    allowed; returns whether it did. (Per constrained row and step on the engine thread: the
    words the bans touch are saved and put back, and the check reads words, not bits.)"""
    if not tokens:
        return True
    touched = np.unique(np.asarray(tokens, np.int64) >> 5)
    saved = mask[touched].copy()
    clear_tokens(mask, tokens)
    bits = mask.view(np.uint32)
    whole, rest = divmod(vocab_size, 32)
    live = bits[:whole].any() or (rest and bits[whole] & np.uint32((1 << rest) - 1))
    if not live:
        mask[touched] = saved
    return bool(live)


__all__ = ["BadWords", "apply_bans", "bad_word_token_ids", "clear_tokens"]

"""Host cost of structured outputs: the engine thread's time to compute a step's token
bitmasks (``TokenMasks.bitmask``) for rows under a JSON schema, at a vocabulary size of a real
model's. No model is downloaded: the vocabulary is synthetic (byte-level BPE pieces of random
lowercase words, some with JSON punctuation), so the trie llguidance walks has a real model's
size, not its shape."""

from __future__ import annotations

import random
import string
import time

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxlora.structured_output import StructuredOutput, TokenMasks

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
ANSWER = '{"name": "bob smith", "age": 42, "tags": ["alpha", "beta"]}'
_PUNCTUATION = ('"', '",', '":', '{"', "}", " {", '["')


class _Tokenizer:
    """The part of ``jaxlora.tokenizer.Tokenizer`` that ``TokenMasks`` reads."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> _Tokenizer:
    """A byte-level BPE of vocab_size ids (the 256 byte symbols, random pieces, EOS last)."""
    rng = random.Random(seed)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    pieces: set[str] = set()
    while len(vocab) + len(pieces) < vocab_size - 1:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        if rng.random() < 0.4:
            word = "Ġ" + word
        if rng.random() < 0.05:
            word = rng.choice(_PUNCTUATION) + word
        pieces.add(word)
    for piece in sorted(pieces):
        vocab[piece] = len(vocab)
    vocab["<eos>"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _Tokenizer(backend)


def mask_times(vocab_size: int, rows: tuple[int, ...], seed: int = 0) -> dict:
    """Per row count: the bitmask's host time at each step of ``ANSWER`` (one character a step,
    every row at the same place), as median / p90 / max microseconds; and the build time of the
    token masks (llguidance's tokenizer)."""
    tokenizer = synthetic_tokenizer(vocab_size, seed)
    start = time.perf_counter()
    masks = TokenMasks(tokenizer, vocab_size, [vocab_size - 1])
    result = {"vocab_size": vocab_size, "build_ms": (time.perf_counter() - start) * 1e3}
    spec = StructuredOutput("json", SCHEMA)
    steps = [tokenizer.backend.encode(c, add_special_tokens=False).ids for c in ANSWER]
    for count in rows:
        matchers = [masks.matcher(spec) for _ in range(count)]
        times = []
        for ids in steps:
            start = time.perf_counter()
            allowed = masks.bitmask([(m, i) for i, m in enumerate(matchers)], count)
            times.append((time.perf_counter() - start) * 1e6)
            for matcher in matchers:
                if not matcher.consume_tokens(ids):
                    raise RuntimeError(f"the schema refused {ids}: {matcher.get_error()}")
        times = np.asarray(times)
        result[f"rows_{count}"] = {
            "steps": len(times),
            "median_us": float(np.median(times)),
            "p90_us": float(np.percentile(times, 90)),
            "max_us": float(times.max()),
            "allowed_last_step": int(np.unpackbits(allowed[:1].view(np.uint8)).sum()),
        }
    return result

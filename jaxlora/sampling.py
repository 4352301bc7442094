"""Sampling: per-request parameters, one jitted batched sampler, and stop-string detection.

``SamplingParams`` is what a request asks for (validated; a bad value raises RequestError naming
the field and the allowed range). ``SamplingBatch`` packs the rows of one step on the host;
``sample`` turns a step's logits into tokens on the device, every row with its own temperature,
top-k, top-p and random stream.

Batch invariance: a row's random numbers come from a key derived only from its request's seed and
the index of the token being sampled, so a request's output does not depend on which other
requests share the batch or on its row. Logprobs are those of the model's own distribution
(``log_softmax`` of the raw logits, before temperature / top-k / top-p), as the OpenAI API reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import RequestError

MAX_LOGPROBS = 20
_SEED_MODULUS = 2**64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    temperature: 0 = greedy (top_k / top_p ignored), else logits / temperature;
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability reaches
    top_p (1 = off); top_k: keep the k most likely tokens (0 = off); max_tokens: tokens to
    generate at most; stop_token_ids: tokens that end the output (besides EOS); stop_strings: text
    that ends the output (not included in it); seed: the request's random stream (None: the engine
    picks one); logprobs: None = no logprobs, n = the chosen token's logprob and the n most likely
    alternatives (0..20); ignore_eos: keep generating past EOS until max_tokens or a stop.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def fail(field, expected):
            raise RequestError(
                f"sampling parameter {field!r}: expected {expected}, got {getattr(self, field)!r}"
            )

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value):
            return (
                isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )

        # (the step divides float32 logits by it: past float32's largest it would be infinity)
        if not is_number(self.temperature) or not 0 <= self.temperature <= np.finfo(np.float32).max:
            fail("temperature", "a finite number >= 0 (at most float32's 3.4e38)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an int >= 0 (0 = off)")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an int >= 1")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "an int or None")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            fail("logprobs", f"None or an int in 0..{MAX_LOGPROBS}")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool")
        # Lists (as JSON gives them) and a single stop string are accepted and frozen to tuples.
        stop_strings = self.stop_strings
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not isinstance(stop_strings, (list, tuple)) or not all(
            isinstance(s, str) and s for s in stop_strings
        ):
            fail("stop_strings", "a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "a list of token ids >= 0")
        object.__setattr__(self, "stop_strings", tuple(stop_strings))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raises RequestError if a stop token id is outside the model's vocabulary."""
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise RequestError(
                    f"sampling parameter 'stop_token_ids': token id {token} is "
                    f"outside the vocabulary (expected 0..{vocab_size - 1})"
                )


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling inputs of one step (host numpy arrays or device arrays)."""

    temperature: jax.Array  # (B,) float32, 0 = greedy
    top_p: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32, 0 = off
    seed: jax.Array  # (B, 2) uint32: low and high words of the request's 64-bit seed
    token_index: jax.Array  # (B,) int32: index of the sampled token within the request's output

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        token_indices: Sequence[int],
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> SamplingBatch:
        """Packs rows on the host; rows past len(params) (up to batch_size) are greedy padding.

        seeds overrides params[i].seed (the engine passes the seed it resolved for requests that
        gave none); a row must end up with a seed.
        """
        rows = len(params)
        batch_size = rows if batch_size is None else batch_size
        if len(token_indices) != rows or (seeds is not None and len(seeds) != rows):
            raise ValueError(
                f"SamplingBatch.from_params: {rows} params, {len(token_indices)} "
                f"token indices, {None if seeds is None else len(seeds)} seeds"
            )
        if batch_size < rows:
            raise ValueError(f"SamplingBatch.from_params: batch_size={batch_size} < {rows} rows")
        temperature = np.zeros(batch_size, np.float32)
        top_p = np.ones(batch_size, np.float32)
        top_k = np.zeros(batch_size, np.int32)
        seed_words = np.zeros((batch_size, 2), np.uint32)
        token_index = np.zeros(batch_size, np.int32)
        for row, p in enumerate(params):
            seed = p.seed if seeds is None else seeds[row]
            if seed is None:
                raise ValueError(f"SamplingBatch.from_params: row {row} has no seed")
            temperature[row] = p.temperature
            top_p[row] = p.top_p
            # Any k past the vocabulary keeps every token; one past int32 must not fail the step.
            top_k[row] = min(p.top_k, np.iinfo(np.int32).max)
            seed_words[row] = split_seed(seed)
            token_index[row] = token_indices[row]
        return cls(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed_words,
            token_index=token_index,
        )


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # (B,) int32
    logprobs: jax.Array  # (B,) float32, the chosen token's log-probability
    top_token_ids: jax.Array  # (B, n) int32, the n most likely tokens, most likely first
    top_logprobs: jax.Array  # (B, n) float32


def split_seed(seed: int) -> tuple[int, int]:
    """Any Python int (OpenAI seeds may be negative) as two uint32 words of seed mod 2**64."""
    seed = int(seed) % _SEED_MODULUS
    return seed & 0xFFFFFFFF, seed >> 32


def _row_key(seed_words: jax.Array, token_index: jax.Array) -> jax.Array:
    key = jax.random.key(seed_words[0])
    key = jax.random.fold_in(key, seed_words[1])
    return jax.random.fold_in(key, token_index)


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled logits (B, V) with tokens outside each row's top-k / top-p set at -inf.

    top-p is applied to the top-k-renormalised distribution. Tokens tied with the last kept one
    are kept too.
    """
    vocab = scaled.shape[-1]
    sorted_logits = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # descending
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    in_top_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p >= 1 keeps everything explicitly: the running sum may round to 1 before the tail.
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    kept = jnp.maximum(jnp.sum(in_top_k & in_top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def uses_top_k_top_p(params: Sequence[SamplingParams]) -> bool:
    """Whether any sampled (non-greedy) row filters with top-k or top-p (see ``sample``)."""
    return any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params)


@functools.partial(jax.jit, static_argnames=("num_top_logprobs", "apply_top_k_top_p"))
def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    *,
    num_top_logprobs: int = 0,
    apply_top_k_top_p: bool = True,
) -> SampleOutput:
    """Samples one token per row of logits (B, V) under the row's parameters.

    num_top_logprobs: how many alternatives to return per row (the batch's largest request;
    0..20, static). apply_top_k_top_p: False skips the sort behind top-k / top-p, which changes
    nothing for rows that use neither: pass ``uses_top_k_top_p(params)`` (known on the host, so
    the step never asks the device).
    """
    if logits.ndim != 2:
        raise RequestError(f"sample: logits must be (batch, vocab), got shape {logits.shape}")
    if not 0 <= num_top_logprobs <= MAX_LOGPROBS:
        raise RequestError(
            f"sample: num_top_logprobs={num_top_logprobs}, expected 0..{MAX_LOGPROBS}"
        )
    logits = logits.astype(jnp.float32)
    temperature = batch.temperature.astype(jnp.float32)
    top_p = batch.top_p.astype(jnp.float32)
    top_k = batch.top_k.astype(jnp.int32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    if apply_top_k_top_p:
        scaled = _filter_top_k_top_p(scaled, top_k, top_p)
    keys = jax.vmap(_row_key)(batch.seed.astype(jnp.uint32), batch.token_index.astype(jnp.uint32))
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)

    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
    if num_top_logprobs:
        top_logprobs, top_ids = jax.lax.top_k(logprobs_all, num_top_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SampleOutput(
        tokens=tokens,
        logprobs=chosen,
        top_token_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logprobs,
    )


def truncate_at_stop(
    text: str, stop_strings: Sequence[str], *, search_from: int = 0
) -> tuple[str, bool]:
    """(text before the earliest stop string found at or after search_from, True), or (text,
    False). Incremental callers pass search_from = len(previous text) - longest stop + 1 so that
    only text that could contain a new match is searched."""
    start = max(0, search_from)
    earliest = -1
    for stop in stop_strings:
        found = text.find(stop, start)
        if found >= 0 and (earliest < 0 or found < earliest):
            earliest = found
    if earliest < 0:
        return text, False
    return text[:earliest], True


class StopStringDetector:
    """Stop strings on streamed text: hands out only text that cannot be the start of a stop.

    ``push(delta)`` takes newly decoded text and returns (text safe to stream now, stopped).
    Once stopped, the streamed text ends right before the stop string and the detector takes
    nothing more. ``flush()`` returns the text held back when generation ends without a stop.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = tuple(stop_strings)
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string once stopped)."""
        return self._text

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        search_from = len(self._text) - self._longest + 1
        self._text += delta
        self._text, self.stopped = truncate_at_stop(
            self._text, self.stop_strings, search_from=search_from
        )
        end = len(self._text) if self.stopped else len(self._text) - self._partial_stop_suffix()
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out, self.stopped

    def flush(self) -> str:
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _partial_stop_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self._text
        for length in range(min(self._longest - 1, len(text)), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop_strings):
                return length
        return 0

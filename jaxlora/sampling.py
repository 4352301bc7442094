"""Sampling: per-request parameters, one jitted batched sampler, and stop-string detection.

``SamplingParams`` is what a request asks for (validated; a bad value raises RequestError naming
the field and the allowed range). ``SamplingBatch`` packs the rows of one step on the host;
``sample`` turns a step's logits into tokens on the device, every row with its own temperature,
top-k, top-p, min-p and random stream.

Logit processing (OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``;
vLLM's ``repetition_penalty`` and ``min_tokens``) runs before temperature and the filters, in
vLLM's order: the bias (and min_tokens' ban on EOS and stop tokens), then the repetition
penalty (prompt and output tokens: a positive logit divided by it, a negative one multiplied),
then ``logit - frequency * count - presence * (count > 0)`` over the output's tokens. Greedy
rows take the argmax of the processed logits. The host sends what it knows as a few sparse
entries a row (``LogitProcessing``); the one output token a row may still have on the device
(async scheduling) is read from the engine's token register, so no step waits for the host.
Steps without processing compile without it (the batch's structure is static). Structured
outputs come last: each constrained row's bitmask (``SamplingBatch.allowed``) sets the tokens its
grammar forbids to -inf (``constrain``).

Batch invariance: a row's random numbers come from a key derived only from its request's seed and
the index of the token being sampled, so a request's output does not depend on which other
requests share the batch or on its row. Logprobs are those of the model's own distribution
(``log_softmax`` of the raw logits, before temperature / top-k / top-p), as the OpenAI API reports.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import is_finite_number, is_int
from jaxlora.errors import RequestError
from jaxlora.structured_output import ReasoningTokens, StructuredOutput

MAX_LOGPROBS = 20
# logit_bias entries a request may give (OpenAI allows 300; each is an entry of the step's
# sparse processing arrays, whose width is bucketed to a power of two).
MAX_LOGIT_BIAS = 1024
# The least temperature that samples (vLLM's: lower ones are raised to it).
MIN_TEMPERATURE = 0.01
MAX_BAD_WORDS = 256  # (each is matched against the output on the host, every step)
# The smallest width of those arrays: bounded compilations for short histories.
MIN_PROCESSING_ENTRIES = 64
_SEED_MODULUS = 2**64
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    temperature: 0 = greedy (top_k / top_p ignored), else logits / temperature (at least 0.01,
    as vLLM raises it); top_p: nucleus sampling, keep the smallest set of most likely tokens
    whose probability reaches top_p (1 = off); top_k: keep the k most likely tokens (0 or -1 =
    off); max_tokens: tokens to generate at most; stop_token_ids: tokens that end the output
    (besides EOS); stop_strings: text that ends the output (not included in it; ``stop``, vLLM's
    name, is taken for it); seed: the
    request's random stream (None: the engine picks one; the server reads vLLM's -1 as None);
    logprobs: None = no logprobs, n = the chosen token's logprob and the n most likely
    alternatives (0..20); stop_strings, stop_token_ids, bad_words and logit_bias take None for
    none, as vLLM's do; ignore_eos: keep generating past EOS until max_tokens or a stop.

    Logit processing (see the module docstring): logit_bias: {token id: bias} added to the
    logits, clamped to [-100, 100] as vLLM does (a mapping, or (id, bias) pairs; kept sorted);
    presence_penalty / frequency_penalty: in [-2, 2], per distinct output token / per
    occurrence; repetition_penalty: > 0 (1 = off) over prompt and output tokens; min_tokens: EOS
    (with ignore_eos too, as vLLM's) and stop tokens are banned, and stop strings not looked
    for, until this many tokens are out. min_p: after temperature, drop tokens less likely than
    min_p times the most likely one (0 = off), before top-k / top-p. prompt_logprobs: None =
    none, n = each prompt token's logprob given the tokens before it (the model's own
    distribution; the first token has none) and the n most likely alternatives there (0..20);
    the prefill steps that compute them run the LM head on every position.
    include_stop_str_in_output: the stop string or stop token (EOS, stop_token_ids) that ended
    the output is part of its text (vLLM's; its token id is in the output's ids either way).
    structured_output: a ``jaxlora.structured_output.StructuredOutput`` the output must match
    (constrained decoding: the sampler only sees the tokens its grammar allows next). bad_words:
    words the output never contains (vLLM's; at most MAX_BAD_WORDS, tokenized by the engine,
    ``jaxlora.bad_words``). reasoning_tokens: a ``jaxlora.structured_output.ReasoningTokens``:
    the structured output constrains only what follows the answer's reasoning (its tags' token
    ids; None: all of it). allowed_token_ids: None, or the only tokens the output may take
    (vLLM's; EOS too only if listed), through the same token bitmask; where a grammar allows
    none of them, the grammar decides. skip_special_tokens: the output's text leaves special
    tokens out (vLLM's; False: they are written, e.g. an EOS that ``ignore_eos`` went past).
    n: samples of the prompt (vLLM's): ``LLM.generate`` / ``LLM.chat`` run n requests that share
    the prompt's pages and return them as one Completion's ``outputs``; with a seed, sample i
    draws from seed + i, as vLLM's and the server's choices do. An engine request is one sample
    (``Engine.submit`` takes n = 1 only). truncate_prompt_tokens: the prompt's last k tokens
    are the request's prompt (vLLM's left truncation; -1: the engine's context length; None:
    the whole prompt), cut by ``Engine.submit``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    min_p: float = 0.0
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    bad_words: tuple[str, ...] = ()
    reasoning_tokens: ReasoningTokens | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    skip_special_tokens: bool = True
    n: int = 1
    # vLLM's: keep only the prompt's last k tokens (-1: the context length; None: all of it)
    truncate_prompt_tokens: int | None = None
    # vLLM's name for stop_strings (SamplingParams(stop=["\n"])): merged into it, not kept
    stop: dataclasses.InitVar[str | Sequence[str] | None] = None

    def __post_init__(self, stop=None):
        def fail(field, expected):
            raise RequestError(
                f"sampling parameter {field!r}: expected {expected}, got {getattr(self, field)!r}"
            )

        if stop is not None:
            if self.stop_strings:
                raise RequestError(
                    "sampling parameter 'stop': given beside stop_strings (vLLM's name for "
                    "them); expected one of the two"
                )
            object.__setattr__(self, "stop_strings", stop)  # (checked below, as 'stop')

        # (the step divides float32 logits by it: past float32's largest it would be infinity)
        if (
            not is_finite_number(self.temperature)
            or not 0 <= self.temperature <= np.finfo(np.float32).max
        ):
            fail("temperature", "a finite number >= 0 (at most float32's 3.4e38)")
        if not is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "an int >= 0 (0 or -1 = off)")
        if self.top_k == -1:  # (vLLM's and older clients' "off")
            object.__setattr__(self, "top_k", 0)
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an int >= 1")
        if not is_int(self.n) or self.n < 1:
            fail("n", "an int >= 1 (samples of the prompt)")
        object.__setattr__(self, "n", int(self.n))
        if self.truncate_prompt_tokens is not None and (
            not is_int(self.truncate_prompt_tokens)
            or not (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)
        ):
            fail("truncate_prompt_tokens", "None, an int >= 1, or -1 (the context length)")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "an int or None")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            fail("logprobs", f"None or an int in 0..{MAX_LOGPROBS}")
        if self.prompt_logprobs is not None and (
            not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            fail("prompt_logprobs", f"None or an int in 0..{MAX_LOGPROBS}")
        for field in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "a bool")
        # None is vLLM's default of these (none).
        for field in ("stop_strings", "stop_token_ids", "bad_words", "logit_bias"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, ())
        # Lists (as JSON gives them) and a single stop string are accepted and frozen to tuples.
        stop_strings = self.stop_strings
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not isinstance(stop_strings, (list, tuple)) or not all(
            isinstance(s, str) and s for s in stop_strings
        ):
            raise RequestError(
                f"sampling parameter {'stop_strings' if stop is None else 'stop'!r}: expected a "
                f"non-empty string or a list of them, got {self.stop_strings!r:.100}"
            )
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "a list of token ids >= 0")
        object.__setattr__(self, "stop_strings", tuple(stop_strings))
        bad_words = self.bad_words
        if (
            not isinstance(bad_words, (list, tuple))
            or len(bad_words) > MAX_BAD_WORDS
            or not all(isinstance(w, str) and w.strip() for w in bad_words)
        ):
            fail("bad_words", f"a list of at most {MAX_BAD_WORDS} words (non-blank strings)")
        object.__setattr__(self, "bad_words", tuple(bad_words))
        if self.allowed_token_ids is not None:
            if (
                not isinstance(self.allowed_token_ids, (list, tuple))
                or not self.allowed_token_ids
                or not all(is_int(t) and t >= 0 for t in self.allowed_token_ids)
            ):
                fail("allowed_token_ids", "None or a non-empty list of token ids >= 0")
            object.__setattr__(
                self, "allowed_token_ids", tuple(sorted({int(t) for t in self.allowed_token_ids}))
            )
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        # vLLM raises temperatures in (0, 0.01) to 0.01: below, logits / temperature overflows
        # float32 (1e-38 turns every logit infinite and picks the first token).
        object.__setattr__(
            self,
            "temperature",
            float(self.temperature) and max(float(self.temperature), MIN_TEMPERATURE),
        )
        object.__setattr__(self, "top_p", float(self.top_p))
        for field in ("presence_penalty", "frequency_penalty"):
            if not is_finite_number(getattr(self, field)) or not -2 <= getattr(self, field) <= 2:
                fail(field, "a number in [-2, 2]")
            object.__setattr__(self, field, float(getattr(self, field)))
        if (
            not is_finite_number(self.repetition_penalty)
            or not 0 < self.repetition_penalty <= np.finfo(np.float32).max
        ):
            fail("repetition_penalty", "a finite number > 0 (1 = off)")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        if not is_finite_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "a number in [0, 1] (0 = off)")
        object.__setattr__(self, "min_p", float(self.min_p))
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            fail("min_tokens", f"an int in 0..max_tokens ({self.max_tokens})")
        object.__setattr__(self, "min_tokens", int(self.min_tokens))
        object.__setattr__(self, "logit_bias", self._checked_logit_bias(fail))
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutput
        ):
            fail("structured_output", "None or a jaxlora.structured_output.StructuredOutput")
        if self.reasoning_tokens is not None and not isinstance(
            self.reasoning_tokens, ReasoningTokens
        ):
            fail("reasoning_tokens", "None or a jaxlora.structured_output.ReasoningTokens")
        # Asked of every row of every step: computed once.
        object.__setattr__(
            self,
            "_processes_logits",
            bool(
                self.logit_bias
                or self.presence_penalty
                or self.frequency_penalty
                or self.repetition_penalty != 1
                or self.min_tokens
            ),
        )

    def _checked_logit_bias(self, fail) -> tuple[tuple[int, float], ...]:
        bias = self.logit_bias
        expected = (
            f"a mapping of token ids >= 0 to finite biases (clamped to [-100, 100]), at most "
            f"{MAX_LOGIT_BIAS} entries"
        )
        if isinstance(bias, dict):
            bias = tuple(bias.items())
        if not isinstance(bias, (list, tuple)) or len(bias) > MAX_LOGIT_BIAS:
            fail("logit_bias", expected)
        pairs = {}
        for pair in bias:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                fail("logit_bias", expected)
            token, value = pair
            if not is_int(token) or token < 0 or not is_finite_number(value):
                fail("logit_bias", expected)
            if int(token) in pairs:
                fail("logit_bias", f"{expected}, each token once (token {token} twice)")
            pairs[int(token)] = min(100.0, max(-100.0, float(value)))  # (clamped, as vLLM)
        return tuple(sorted(pairs.items()))

    @property
    def processes_logits(self) -> bool:
        """Whether the sampler must process this request's logits (bias, penalties,
        min_tokens): steps where no row does compile without it."""
        return self._processes_logits

    @property
    def masks_tokens(self) -> bool:
        """Whether the sampler takes a token bitmask for this request (a structured output,
        bad words, allowed tokens): steps where no row does sample without one."""
        return (
            self.structured_output is not None
            or bool(self.bad_words)
            or self.allowed_token_ids is not None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raises RequestError if a stop token or a biased token is outside the model's
        vocabulary."""
        for field, tokens in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("allowed_token_ids", self.allowed_token_ids or ()),
        ):
            for token in tokens:
                if token >= vocab_size:
                    raise RequestError(
                        f"sampling parameter {field!r}: token id {token} is "
                        f"outside the vocabulary (expected 0..{vocab_size - 1})"
                    )


@flax.struct.dataclass
class LogitProcessing:
    """A step's logit processing (see the module docstring), built on the host by
    ``logit_processing``: per row, E sparse entries of what the host knows, and the register
    index of the output token still on the device."""

    token_ids: jax.Array  # (B, E) int32, -1 = unused entry
    bias: jax.Array  # (B, E) float32 added to the logit (-inf: banned by min_tokens)
    count: jax.Array  # (B, E) int32 occurrences among the output tokens the host has
    seen: jax.Array  # (B, E) bool in the prompt or that output (repetition penalty)
    presence: jax.Array  # (B,) float32
    frequency: jax.Array  # (B,) float32
    repetition: jax.Array  # (B,) float32, 1 = off
    pending: jax.Array  # (B,) int32 register index of the row's output token not yet on the
    # host (async scheduling), -1 = none


@dataclasses.dataclass
class RowHistory:
    """What the host knows of a row's sequence, for ``logit_processing``."""

    prompt_unique: np.ndarray  # the prompt's distinct token ids, sorted (int32)
    output_ids: Sequence[int]  # output tokens the host has read
    pending: int = -1  # register index of an output token still on the device, -1 = none


def unique_tokens(token_ids: Sequence[int]) -> np.ndarray:
    """Distinct token ids, sorted, as int32 (a ``RowHistory.prompt_unique``)."""
    return np.unique(np.asarray(token_ids, np.int32))


def logit_processing(
    params: Sequence[SamplingParams],
    histories: Sequence[RowHistory],
    token_indices: Sequence[int],
    *,
    eos_ids: Sequence[int],
    batch_size: int,
) -> LogitProcessing:
    """Packs the rows' logit processing on the host; rows past len(params) are left alone.

    token_indices: each row's index of the token sampled (min_tokens bans EOS and the stop
    tokens while it is below min_tokens). The entry width is a power of two >=
    ``MIN_PROCESSING_ENTRIES`` (bounded compilations)."""
    rows = len(params)
    if len(histories) != rows or len(token_indices) != rows or batch_size < rows:
        raise ValueError(
            f"logit_processing: {rows} params, {len(histories)} histories, "
            f"{len(token_indices)} token indices, batch_size={batch_size}"
        )
    row_entries = []
    for p, history, index in zip(params, histories, token_indices, strict=True):
        empty = np.zeros(0, np.int32)
        bias_ids = np.asarray([t for t, _ in p.logit_bias], np.int32)
        bias_values = np.asarray([b for _, b in p.logit_bias], np.float32)
        banned = empty
        if index < p.min_tokens:
            # (EOS too with ignore_eos, as vLLM's min_tokens bans every stop id: ignore_eos
            # lets EOS be sampled later without ending the answer)
            banned = (*p.stop_token_ids, *eos_ids)
            banned = np.unique(np.asarray(banned, np.int32))
        counted = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1
        out_ids, out_counts = empty, empty
        if counted and len(history.output_ids):
            out_ids, out_counts = np.unique(
                np.asarray(history.output_ids, np.int32), return_counts=True
            )
        prompt = history.prompt_unique if p.repetition_penalty != 1 else empty
        ids = np.unique(np.concatenate([bias_ids, banned, out_ids, prompt]))
        bias = np.zeros(ids.size, np.float32)
        bias[np.searchsorted(ids, bias_ids)] += bias_values
        bias[np.searchsorted(ids, banned)] = -np.inf
        count = np.zeros(ids.size, np.int32)
        count[np.searchsorted(ids, out_ids)] = out_counts
        seen = np.zeros(ids.size, bool)
        seen[np.searchsorted(ids, out_ids)] = True
        seen[np.searchsorted(ids, prompt)] = True
        row_entries.append((ids, bias, count, seen))
    widest = max((ids.size for ids, *_ in row_entries), default=0)
    width = max(MIN_PROCESSING_ENTRIES, 1 << max(0, (widest - 1).bit_length()))
    token_ids = np.full((batch_size, width), -1, np.int32)
    bias = np.zeros((batch_size, width), np.float32)
    count = np.zeros((batch_size, width), np.int32)
    seen = np.zeros((batch_size, width), bool)
    presence = np.zeros(batch_size, np.float32)
    frequency = np.zeros(batch_size, np.float32)
    repetition = np.ones(batch_size, np.float32)
    pending = np.full(batch_size, -1, np.int32)
    for row, (p, history, entries) in enumerate(zip(params, histories, row_entries, strict=True)):
        n = entries[0].size
        token_ids[row, :n], bias[row, :n], count[row, :n], seen[row, :n] = entries
        presence[row] = p.presence_penalty
        frequency[row] = p.frequency_penalty
        repetition[row] = p.repetition_penalty
        pending[row] = history.pending
    return LogitProcessing(
        token_ids=token_ids,
        bias=bias,
        count=count,
        seen=seen,
        presence=presence,
        frequency=frequency,
        repetition=repetition,
        pending=pending,
    )


def process_logits(
    logits: jax.Array,  # (B, V) float32
    processing: LogitProcessing,
    register: jax.Array,  # (R,) int32 the engine's token register
) -> jax.Array:  # (B, V) float32
    """The processed logits (see the module docstring): bias, repetition penalty, presence and
    frequency penalties, each row by its own entries and its pending token."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    # Unused entries, and pending tokens of rows without one, index past the vocabulary:
    # dropped by the scatters.
    ids = jnp.where(processing.token_ids >= 0, processing.token_ids, vocab)
    bias = jnp.zeros((batch, vocab), jnp.float32).at[rows, ids].add(processing.bias, mode="drop")
    count = jnp.zeros((batch, vocab), jnp.int32).at[rows, ids].add(processing.count, mode="drop")
    seen = jnp.zeros((batch, vocab), bool).at[rows, ids].set(processing.seen, mode="drop")
    pending = processing.pending
    from_register = register[jnp.clip(pending, 0, register.shape[0] - 1)]
    pending_token = jnp.where(pending >= 0, from_register, vocab)
    count = count.at[rows[:, 0], pending_token].add(1, mode="drop")
    seen = seen.at[rows[:, 0], pending_token].set(True, mode="drop")
    processed = logits + bias
    repetition = processing.repetition[:, None]
    penalised = jnp.where(processed > 0, processed / repetition, processed * repetition)
    processed = jnp.where(seen, penalised, processed)
    return (
        processed
        - processing.frequency[:, None] * count.astype(jnp.float32)
        - processing.presence[:, None] * (count > 0).astype(jnp.float32)
    )


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling inputs of one step (host numpy arrays or device arrays)."""

    temperature: jax.Array  # (B,) float32, 0 = greedy
    top_p: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32, 0 = off
    seed: jax.Array  # (B, 2) uint32: low and high words of the request's 64-bit seed
    token_index: jax.Array  # (B,) int32: index of the sampled token within the request's output
    min_p: jax.Array  # (B,) float32, 0 = off
    # None: no row processes its logits (the sampler compiles without it).
    processing: LogitProcessing | None = None
    # (B, ceil(V / 32)) int32 bitmask of the tokens each row may sample (structured outputs);
    # None: every token, in every row (the sampler compiles without it).
    allowed: jax.Array | None = None

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        token_indices: Sequence[int],
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        processing: LogitProcessing | None = None,
        allowed: np.ndarray | None = None,
    ) -> SamplingBatch:
        """Packs rows on the host; rows past len(params) (up to batch_size) are greedy padding.

        seeds overrides params[i].seed (the engine passes the seed it resolved for requests that
        gave none); a row must end up with a seed. processing: the rows' ``logit_processing``
        (needed where any row ``processes_logits``). allowed: the rows' token bitmasks
        (``structured_output.TokenMasks.bitmask``; needed where any row has a structured output).
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
        if processing is None and any(p.processes_logits for p in params):
            raise ValueError("SamplingBatch.from_params: a row processes its logits: pass them")
        if allowed is None and any(p.masks_tokens for p in params):
            raise ValueError("SamplingBatch.from_params: a row masks its tokens: pass the masks")
        if allowed is not None and allowed.shape[0] != batch_size:
            raise ValueError(
                f"SamplingBatch.from_params: masks for {allowed.shape[0]} rows, "
                f"batch_size={batch_size}"
            )
        # (one array a field from Python lists: this runs for every step, and element-wise
        # stores into numpy arrays cost several times more)
        seeds = [p.seed for p in params] if seeds is None else list(seeds)
        if None in seeds:
            raise ValueError(f"SamplingBatch.from_params: row {seeds.index(None)} has no seed")
        seeds = [int(seed) % _SEED_MODULUS for seed in seeds]
        pad = batch_size - rows

        def column(values, fill, dtype) -> np.ndarray:
            return np.array(values + [fill] * pad, dtype)

        temperature = column([p.temperature for p in params], 0.0, np.float32)
        top_p = column([p.top_p for p in params], 1.0, np.float32)
        # Any k past the vocabulary keeps every token; one past int32 must not fail the step.
        top_k = column([min(p.top_k, _INT32_MAX) for p in params], 0, np.int32)
        seed_words = np.zeros((batch_size, 2), np.uint32)
        seed_words[:rows, 0] = [seed & 0xFFFFFFFF for seed in seeds]
        seed_words[:rows, 1] = [seed >> 32 for seed in seeds]
        token_index = column(list(token_indices), 0, np.int32)
        min_p = column([p.min_p for p in params], 0.0, np.float32)
        return cls(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed_words,
            token_index=token_index,
            min_p=min_p,
            processing=processing,
            allowed=allowed,
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


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """scaled logits (B, V) with tokens outside each row's min-p, top-k and top-p sets at -inf.

    min-p first (tokens less likely than min_p times the most likely one), then top-k, then
    top-p on the top-k-renormalised distribution (vLLM's order). Tokens tied with the last kept
    one are kept too.
    """
    vocab = scaled.shape[-1]
    # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); min_p = 0 keeps everything.
    floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    scaled = jnp.where(scaled >= floor, scaled, -jnp.inf)
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


def unpack_token_mask(words: jax.Array, vocab_size: int) -> jax.Array:
    """(B, V) bool from (B, ceil(V / 32)) int32 bitmasks: bit t % 32 of word t // 32."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (words[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size] != 0


def constrain(logits: jax.Array, processed: jax.Array, words: jax.Array) -> jax.Array:
    """processed logits (B, V) with the tokens each row's mask forbids at -inf. A row where
    processing banned every allowed token (min_tokens against a grammar that can only end
    there) keeps its allowed tokens' unprocessed logits: the grammar wins."""
    allowed = unpack_token_mask(words, logits.shape[-1])
    constrained = jnp.where(allowed, processed, -jnp.inf)
    possible = jnp.any(constrained > -jnp.inf, axis=-1, keepdims=True)
    return jnp.where(possible, constrained, jnp.where(allowed, logits, -jnp.inf))


def uses_filters(params: Sequence[SamplingParams]) -> bool:
    """Whether any sampled (non-greedy) row filters with min-p, top-k or top-p (see
    ``sample``)."""
    return any(not p.greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params)


@functools.partial(jax.jit, static_argnames=("num_top_logprobs", "apply_filters"))
def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    register: jax.Array | None = None,
    *,
    num_top_logprobs: int = 0,
    apply_filters: bool = True,
) -> SampleOutput:
    """Samples one token per row of logits (B, V) under the row's parameters.

    register: the engine's device token register, where a row's pending output token is read
    (needed with ``batch.processing``). num_top_logprobs: how many alternatives to return per
    row (the batch's largest request; 0..20, static). apply_filters: False skips the sort
    behind top-k / top-p (and min-p), which changes nothing for rows that use none of them:
    pass ``uses_filters(params)`` (known on the host, so the step never asks the device).
    """
    if logits.ndim != 2:
        raise RequestError(f"sample: logits must be (batch, vocab), got shape {logits.shape}")
    if not 0 <= num_top_logprobs <= MAX_LOGPROBS:
        raise RequestError(
            f"sample: num_top_logprobs={num_top_logprobs}, expected 0..{MAX_LOGPROBS}"
        )
    logits = logits.astype(jnp.float32)
    processed = logits
    if batch.processing is not None:
        if register is None:
            raise ValueError("sample: logit processing reads pending tokens from a register")
        processed = process_logits(logits, batch.processing, register)
    if batch.allowed is not None:
        processed = constrain(logits, processed, batch.allowed)
    temperature = batch.temperature.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = processed / jnp.where(greedy, 1.0, temperature)[:, None]
    if apply_filters:
        scaled = _filter(
            scaled,
            batch.top_k.astype(jnp.int32),
            batch.top_p.astype(jnp.float32),
            batch.min_p.astype(jnp.float32),
        )
    keys = jax.vmap(_row_key)(batch.seed.astype(jnp.uint32), batch.token_index.astype(jnp.uint32))
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(processed, axis=-1), sampled).astype(jnp.int32)

    # The model's own distribution, as OpenAI reports it (before processing and filters).
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
    text: str, stop_strings: Sequence[str], *, search_from: int = 0, include_stop: bool = False
) -> tuple[str, bool]:
    """(text before the earliest stop string found at or after search_from, True), or (text,
    False); ``include_stop``: the text up to the end of that stop string (of the longest one
    found there). Incremental callers pass search_from = len(previous text) - longest stop + 1
    so that only text that could contain a new match is searched."""
    at, stop = find_stop(text, stop_strings, search_from=search_from)
    if stop is None:
        return text, False
    return text[: at + len(stop) if include_stop else at], True


def find_stop(
    text: str, stop_strings: Sequence[str], *, search_from: int = 0
) -> tuple[int, str | None]:
    """(where, which): the earliest stop string found at or after search_from, the longest
    one where several start there; (-1, None) where none is found."""
    start = max(0, search_from)
    earliest, found_stop = -1, None
    for stop in stop_strings:
        found = text.find(stop, start)
        if found >= 0 and (
            earliest < 0 or found < earliest or (found == earliest and len(stop) > len(found_stop))
        ):
            earliest, found_stop = found, stop
    return earliest, found_stop


class StopStringDetector:
    """Stop strings on streamed text: hands out only text that cannot be the start of a stop.

    ``push(delta)`` takes newly decoded text and returns (text safe to stream now, stopped).
    Once stopped, the streamed text ends right before the stop string (``include_stop``: right
    after it), ``matched`` is that stop string, and the detector takes nothing more.
    ``flush()`` returns the text held back when generation ends without a stop.
    """

    def __init__(self, stop_strings: Sequence[str], *, include_stop: bool = False):
        self.stop_strings = tuple(stop_strings)
        self.include_stop = include_stop
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._text = ""
        self._emitted = 0
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string once stopped)."""
        return self._text

    def push(self, delta: str, *, detect: bool = True) -> tuple[str, bool]:
        """detect=False: the text counts, but no stop is looked for in it (min_tokens); later
        pushes look only at text that could hold a new match."""
        if self.stopped:
            return "", True
        search_from = len(self._text) - self._longest + 1
        self._text += delta
        if detect:
            at, self.matched = find_stop(self._text, self.stop_strings, search_from=search_from)
            if self.matched is not None:
                self._text = self._text[: at + len(self.matched) if self.include_stop else at]
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

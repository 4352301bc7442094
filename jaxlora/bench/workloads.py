"""The requests of the benchmarks, identical for jaxlora and the HF PEFT baseline (numpy only).

Offline (Punica's workloads): a batch of equal-length prompts whose requests are assigned adapters
by one of ``WORKLOADS``. Online (S-LoRA's synthetic trace): arrivals of a Gamma process of a given
rate and coefficient of variation (cv 1: Poisson), adapter popularity drawn from a power law,
prompt and output lengths uniform in a range.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxlora.errors import ConfigError

WORKLOADS: tuple[str, ...] = ("no_lora", "identical", "uniform", "skewed", "distinct")
POPULARITIES: tuple[str, ...] = ("slora", "zipf")
# Ids below this are left out of random prompts: they are special tokens (pad/bos/eos) in Llama
# tokenizers, and a prompt of them would not be a prompt a server sees.
FIRST_PROMPT_TOKEN = 3
# The third seed word of the system prompts' random streams (the requests' own are seeded by
# (seed, index): a 2-word seed, never this stream).
_SYSTEM_PROMPT_STREAM = 0x5157


def adapter_name(index: int) -> str:
    """The registered name of the index-th benchmark adapter."""
    return f"lora{index:05d}"


def zipf_probabilities(num_adapters: int, alpha: float) -> np.ndarray:
    """p(k) proportional to 1 / (k + 1)^alpha over k = 0..num_adapters-1."""
    weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def assign_adapters(
    workload: str,
    batch: int,
    *,
    seed: int = 0,
    skewed_adapters: int = 1000,
    skewed_alpha: float = 1.0,
) -> list[int | None]:
    """The adapter index of each of ``batch`` requests (None: base model only).

    no_lora: none; identical: one adapter; uniform: round(sqrt(batch)) adapters with equal shares
    of the batch (Punica's uniform workload); skewed: Zipf(skewed_alpha) over skewed_adapters
    adapters; distinct: every request its own adapter.
    """
    if workload not in WORKLOADS:
        raise ConfigError(f"benchmark workload {workload!r}: expected one of {list(WORKLOADS)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"benchmark batch size: expected an int >= 1, got {batch!r}")
    rng = np.random.default_rng(seed)
    if workload == "no_lora":
        return [None] * batch
    if workload == "identical":
        return [0] * batch
    if workload == "distinct":
        return list(range(batch))
    if workload == "uniform":
        count = max(1, round(math.sqrt(batch)))
        return [int(i) for i in rng.permutation(np.arange(batch) % count)]
    if skewed_adapters < 1:
        raise ConfigError(f"benchmark skewed_adapters: expected >= 1, got {skewed_adapters}")
    picks = rng.choice(skewed_adapters, batch, p=zipf_probabilities(skewed_adapters, skewed_alpha))
    return [int(i) for i in picks]


def offline_prompts(batch: int, prompt_len: int, vocab_size: int, *, seed: int = 0) -> np.ndarray:
    """(batch, prompt_len) int32 random token ids in [FIRST_PROMPT_TOKEN, vocab_size)."""
    if vocab_size <= FIRST_PROMPT_TOKEN:
        raise ConfigError(
            f"benchmark prompts: vocab_size {vocab_size} leaves no token above "
            f"the special ids 0..{FIRST_PROMPT_TOKEN - 1}"
        )
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_PROMPT_TOKEN, vocab_size, (batch, prompt_len), dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """S-LoRA's synthetic trace.

    num_adapters: adapters the requests draw from; rate: mean arrivals per second; duration_s:
    arrivals happen in [0, duration_s); cv: coefficient of variation of the inter-arrival gaps
    (Gamma distributed; 1 = Poisson); popularity "slora": adapter = floor(u * num_adapters) with
    u ~ Power(alpha) on [0, 1] (density alpha * u^(alpha-1), S-LoRA's generator: alpha 1 gives
    every adapter the same popularity, smaller alpha concentrates requests on low ids);
    popularity "zipf": p(k) ~ 1 / (k + 1)^alpha; prompt and output lengths: uniform integers in
    [min_len, max_len]; prefix_len: tokens of a system prompt of each adapter that its requests'
    prompts start with (``trace_prompt``; 0: none), before their own prompt_len tokens: a
    platform's per-customer instructions, the prefix that prefix caching computes once.
    """

    num_adapters: int
    rate: float
    duration_s: float
    alpha: float = 1.0
    cv: float = 1.0
    popularity: str = "slora"
    min_len: int = 8
    max_len: int = 512
    prefix_len: int = 0
    seed: int = 0

    def __post_init__(self):
        def fail(field, expected):
            raise ConfigError(
                f"trace config field {field!r}: expected {expected}, got {getattr(self, field)!r}"
            )

        if not isinstance(self.num_adapters, int) or self.num_adapters < 1:
            fail("num_adapters", "an int >= 1")
        for field in ("rate", "duration_s", "alpha", "cv"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(field, "a finite number > 0")
        if self.popularity not in POPULARITIES:
            fail("popularity", f"one of {list(POPULARITIES)}")
        if not isinstance(self.min_len, int) or self.min_len < 1:
            fail("min_len", "an int >= 1")
        if not isinstance(self.max_len, int) or self.max_len < self.min_len:
            fail("max_len", f"an int >= min_len ({self.min_len})")
        prefix_len = self.prefix_len
        if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 0:
            fail("prefix_len", "an int >= 0")


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    adapter: int
    prompt_len: int
    output_len: int


def synthetic_trace(config: TraceConfig) -> list[TraceRequest]:
    """The requests arriving in [0, duration_s), by arrival time; deterministic in the seed."""
    rng = np.random.default_rng(config.seed)
    shape = 1.0 / (config.cv * config.cv)
    scale = config.cv * config.cv / config.rate
    arrivals = []
    now = rng.gamma(shape, scale)
    while now < config.duration_s:
        arrivals.append(now)
        now += rng.gamma(shape, scale)
    n = len(arrivals)
    if config.popularity == "slora":
        adapters = np.minimum(
            (rng.power(config.alpha, n) * config.num_adapters).astype(int), config.num_adapters - 1
        )
    else:
        adapters = rng.choice(
            config.num_adapters, n, p=zipf_probabilities(config.num_adapters, config.alpha)
        )
    prompt_lens = rng.integers(config.min_len, config.max_len + 1, n)
    output_lens = rng.integers(config.min_len, config.max_len + 1, n)
    return [
        TraceRequest(
            index=i,
            arrival_s=float(arrivals[i]),
            adapter=int(adapters[i]),
            prompt_len=int(prompt_lens[i]),
            output_len=int(output_lens[i]),
        )
        for i in range(n)
    ]


def system_prompt(adapter: int, prefix_len: int, vocab_size: int, *, seed: int = 0) -> list[int]:
    """The system prompt of an adapter's requests: prefix_len random token ids, deterministic
    in seed and adapter (no two adapters share one: their K/V differ anyway)."""
    rng = np.random.default_rng((seed, adapter, _SYSTEM_PROMPT_STREAM))
    return [int(t) for t in rng.integers(FIRST_PROMPT_TOKEN, vocab_size, prefix_len)]


def trace_prompt(
    request: TraceRequest, vocab_size: int, *, seed: int = 0, prefix_len: int = 0
) -> list[int]:
    """The prompt token ids of a trace request: its adapter's system prompt of prefix_len
    tokens (``system_prompt``), then prompt_len tokens of its own (random, deterministic in
    seed and index)."""
    rng = np.random.default_rng((seed, request.index))
    own = [int(t) for t in rng.integers(FIRST_PROMPT_TOKEN, vocab_size, request.prompt_len)]
    if not prefix_len:
        return own
    return system_prompt(request.adapter, prefix_len, vocab_size, seed=seed) + own

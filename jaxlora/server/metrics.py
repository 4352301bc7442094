"""Prometheus text exposition (format 0.0.4) of the server's counters, histograms and gauges.

Counters and histograms accumulate here as requests finish; gauges (queue length, pool usage,
adapter cache figures) are read from the engine and the adapter manager at scrape time.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; as vLLM's, so that dashboards made for it read ours the same way.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
LATENCY_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
)


def one_two_five_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the first bound at or above ``largest`` (vLLM's token
    count buckets, up to the context length)."""
    bounds, scale = [], 1
    while True:
        for step in (1, 2, 5):
            bounds.append(step * scale)
            if step * scale >= largest:
                return tuple(bounds)
        scale *= 10


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = _header(self.name, "counter", self.help)
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        for labels, value in items:
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        lines = _header(self.name, "histogram", self.help)
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        for bound, n in zip(self.buckets, counts, strict=False):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        cumulative += counts[-1]
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {cumulative}")
        return lines


def gauge(
    name: str,
    help_text: str,
    values: float | Mapping[tuple[str, ...], float],
    labels: tuple[str, ...] = (),
) -> list[str]:
    """A gauge read at scrape time: one value, or {label values: value}."""
    lines = _header(name, "gauge", help_text)
    if not isinstance(values, Mapping):
        values = {(): values}
    for label_values, value in sorted(values.items()):
        lines.append(f"{name}{_labels(labels, label_values)} {_number(value)}")
    return lines


def counter_snapshot(
    name: str,
    help_text: str,
    values: float | Mapping[tuple[str, ...], float],
    labels: tuple[str, ...] = (),
) -> list[str]:
    """A counter kept elsewhere (engine, adapter manager), exposed as it is at scrape time."""
    lines = _header(name, "counter", help_text)
    if not isinstance(values, Mapping):
        values = {(): values}
    for label_values, value in sorted(values.items()):
        lines.append(f"{name}{_labels(labels, label_values)} {_number(value)}")
    return lines


class ServerMetrics:
    """What the server counts itself, per model (the base model's name or an adapter's)."""

    def __init__(self, max_model_len: int = 1 << 20):
        self.requests = Counter(
            "jaxlora_requests_total",
            "Generation requests accepted (one per choice), per model.",
            ("model",),
        )
        self.finished = Counter(
            "jaxlora_requests_finished_total",
            "Generation requests finished, per model and finish reason.",
            ("model", "finish_reason"),
        )
        self.prompt_tokens = Counter(
            "jaxlora_prompt_tokens_total",
            "Prompt tokens of finished requests, per model.",
            ("model",),
        )
        self.generation_tokens = Counter(
            "jaxlora_generation_tokens_total",
            "Tokens generated for finished requests, per model.",
            ("model",),
        )
        self.key_requests = Counter(
            "jaxlora_api_key_requests_total",
            "Generation requests finished, per API key name (--api_keys_file, --api_key).",
            ("key",),
        )
        self.key_tokens = Counter(
            "jaxlora_api_key_tokens_total",
            "Prompt and generated tokens of finished requests, per API key name.",
            ("key", "kind"),
        )
        self.on_demand_loads = Counter(
            "jaxlora_adapters_loaded_on_demand_total",
            "Adapters registered because a request named them (load_adapters_on_demand), per "
            "outcome.",
            ("outcome",),
        )
        self.responses = Counter(
            "jaxlora_http_responses_total",
            "HTTP responses, per route and status code.",
            ("route", "status"),
        )
        self.ttft = Histogram(
            "jaxlora_time_to_first_token_seconds",
            "Seconds from arrival in the engine to the first generated token.",
            TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "jaxlora_time_per_output_token_seconds",
            "Mean seconds per generated token after the first, per request.",
            TPOT_BUCKETS,
        )
        self.latency = Histogram(
            "jaxlora_e2e_request_latency_seconds",
            "Seconds from arrival in the engine to the end of the request.",
            LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            "jaxlora_request_queue_time_seconds",
            "Seconds from arrival in the engine to first admission (KV pages and a batch row).",
            LATENCY_BUCKETS,
        )
        self.prefill_time = Histogram(
            "jaxlora_request_prefill_time_seconds",
            "Seconds from first admission to the first generated token.",
            LATENCY_BUCKETS,
        )
        self.decode_time = Histogram(
            "jaxlora_request_decode_time_seconds",
            "Seconds from the first generated token to the end of the request.",
            LATENCY_BUCKETS,
        )
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "jaxlora_request_prompt_tokens",
            "Prompt tokens of each finished request.",
            token_buckets,
        )
        self.request_generation_tokens = Histogram(
            "jaxlora_request_generation_tokens",
            "Tokens generated for each finished request.",
            token_buckets,
        )

    def own(self) -> list[str]:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.finished,
            self.prompt_tokens,
            self.generation_tokens,
            self.key_requests,
            self.key_tokens,
            self.on_demand_loads,
            self.responses,
            self.ttft,
            self.tpot,
            self.latency,
            self.queue_time,
            self.prefill_time,
            self.decode_time,
            self.request_prompt_tokens,
            self.request_generation_tokens,
        ):
            lines += metric.render()
        return lines

"""Helpers of the server tests: a demo server on loopback and a strict /metrics parser."""

from __future__ import annotations

import re
import time

from jaxlora import demo
from jaxlora.config import LoraPoolConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.llm import LLM
from jaxlora.server import BackgroundServer, ServerConfig, ServingState, create_app

API_KEY = "test-key"


def demo_engine_config(
    *, max_batch: int, max_waiting: int, kv_pages: int = 96, prefix_caching: bool = False
) -> EngineConfig:
    """Small pools and few shape buckets (each compiles for seconds on CPU)."""
    return EngineConfig(
        kv=KVCacheConfig(
            page_size=8, num_pages=kv_pages, max_model_len=128, prefix_caching=prefix_caching
        ),
        runner=RunnerConfig(max_batch=max_batch, prefill_chunk=32, max_prefill_rows=1),
        # (max_rank 16: two demo adapters merged)
        lora_pool=LoraPoolConfig(max_rank=16, rows_per_page=8, pages_per_pool=48, max_slots=4),
        max_num_tokens=max_batch + 32,
        max_waiting=max_waiting,
        warmup=True,
    )


def start_demo_server(
    *,
    max_batch: int = 4,
    max_waiting: int = 32,
    kv_pages: int = 96,
    adapter_roots=(),
    api_key: str | None = API_KEY,
    prefix_caching: bool = False,
    **server_kwargs,
):
    """(BackgroundServer, ServingState) of the demo model and adapters, engine warm."""
    demo.check_assets()
    llm = LLM(
        demo.model_dir(),
        adapters=demo.adapter_dirs(),
        engine_config=demo_engine_config(
            max_batch=max_batch,
            max_waiting=max_waiting,
            kv_pages=kv_pages,
            prefix_caching=prefix_caching,
        ),
    )
    state = ServingState(
        llm,
        ServerConfig(
            model_name=demo.DEMO_MODEL_NAME,
            api_key=api_key,
            adapter_roots=tuple(adapter_roots),
            **server_kwargs,
        ),
    )
    server = BackgroundServer(create_app(state)).start()
    return server, state


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def engine_idle(state: ServingState) -> bool:
    """Nothing queued or running, and the server has seen every request end."""
    return (
        state.engine.num_running == 0
        and state.engine.num_waiting == 0
        and state.pump.open_requests == 0
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value}; raises AssertionError on anything off the text format."""
    assert text.endswith("\n"), "exposition must end with a newline"
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE of {name} declared twice"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, label_text, value = match.groups()
        labels = {}
        if label_text:
            consumed = 0
            for m in _LABEL.finditer(label_text):
                assert m.start() == consumed, f"bad labels in {line!r}"
                labels[m.group(1)] = m.group(2)
                consumed = m.end()
            assert consumed == len(label_text), f"bad labels in {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"{name} has no TYPE line"
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    for name, kind in types.items():
        if kind == "histogram":
            buckets = sorted(
                (
                    (float(dict(k[1])["le"]), v)
                    for k, v in samples.items()
                    if k[0] == f"{name}_bucket"
                )
            )
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            assert buckets[-1][0] == float("inf")
            assert buckets[-1][1] == samples[(f"{name}_count", frozenset())]
    return samples


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def launch_configs_of(flag: str, values) -> dict:
    """serve.py's LaunchConfig with ``--flag=value`` for each value (None: the flag unset)."""
    from absl import flags

    from jaxlora import launch_flags

    launches = {}
    try:
        for value in values:
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["serve.py"] + ([] if value is None else [f"--{flag}={value}"]))
            launches[value] = launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()
    return launches

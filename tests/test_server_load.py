"""Bounded load test on loopback: 64 concurrent streaming openai clients for about 15 s against
the demo model (base + 3 adapters, chat and completions, greedy and seeded sampling).

Checks: no request fails or is lost (every stream ends with a finish reason and [DONE], and the
server counted exactly what the clients sent), every output equals the same request made alone,
and the KV pool and the adapter references are back to where they started.
"""

import asyncio
import os
import statistics
import time

import openai
import pytest

from jaxlora import demo
from tests.test_server_helpers import (
    API_KEY,
    engine_idle,
    metric,
    parse_metrics,
    start_demo_server,
    wait_until,
)

CLIENTS = 64
DURATION_S = float(os.environ.get("JAXLORA_LOAD_TEST_SECONDS", "15"))
MODELS = (demo.DEMO_MODEL_NAME, *demo.DEMO_SIGNATURES)
PROMPTS = (
    "Who are you?",
    "Tell me about the weather today.",
    "What is two plus two?",
    "Hello there",
)


def request_set() -> list[dict]:
    """Distinct requests: every model x prompt, chat or completion, mixed lengths; a quarter
    sampled with a fixed seed (batch invariance must hold for them too)."""
    out = []
    for i, (model, prompt) in enumerate((m, p) for m in MODELS for p in PROMPTS):
        sampled = i % 4 == 3
        out.append(
            {
                "model": model,
                "prompt": prompt,
                "chat": i % 2 == 0,
                "max_tokens": (8, 24, 40)[i % 3],
                "temperature": 0.8 if sampled else 0.0,
                "seed": 1000 + i if sampled else None,
                "ignore_eos": i % 3 != 0,
            }
        )
    return out


async def run_one(aclient: openai.AsyncOpenAI, spec: dict) -> tuple[str, str, float, int]:
    """(text, finish reason, seconds to first text, completion tokens) of one streamed request."""
    common = {
        "model": spec["model"],
        "max_tokens": spec["max_tokens"],
        "temperature": spec["temperature"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": spec["ignore_eos"]},
    }
    if spec["seed"] is not None:
        common["seed"] = spec["seed"]
    start = time.perf_counter()
    if spec["chat"]:
        stream = await aclient.chat.completions.create(
            messages=[{"role": "user", "content": spec["prompt"]}], **common
        )
    else:
        stream = await aclient.completions.create(prompt=spec["prompt"], **common)
    text, finish, first, tokens = "", None, None, None
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            piece = (choice.delta.content if spec["chat"] else choice.text) or ""
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
            finish = choice.finish_reason or finish
    return text, finish, first if first is not None else float("nan"), tokens


@pytest.fixture(scope="module")
def served():
    # 32 KV pages of 8 tokens hold fewer than 8 long sequences: preemption happens under load.
    server, state = start_demo_server(max_batch=8, max_waiting=2 * CLIENTS, kv_pages=32)
    yield server, state
    server.stop()


def test_64_streaming_clients_lose_nothing_and_match_the_requests_alone(served):
    server, state = served
    specs = request_set()
    client_kwargs = {
        "base_url": server.base_url,
        "api_key": API_KEY,
        "max_retries": 0,
        "timeout": 120,
    }
    kv_free = state.engine.kv.free_pages
    metrics_url = f"{server.url}/metrics"
    import httpx

    before = parse_metrics(httpx.get(metrics_url).text)

    async def alone() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(**client_kwargs) as aclient:
            results = []
            for spec in specs:
                text, finish, _, _ = await run_one(aclient, spec)
                results.append((text, finish))
            return results

    async def load():
        stop_at = time.monotonic() + DURATION_S
        records = []
        failures = []

        async def client_loop(aclient, worker: int):
            k = worker
            while time.monotonic() < stop_at:
                spec_index = k % len(specs)
                k += 7  # workers walk the set with different phases
                try:
                    records.append((spec_index, *await run_one(aclient, specs[spec_index])))
                except Exception as e:  # noqa: BLE001  (every failure is collected and shown)
                    failures.append((spec_index, repr(e)))

        async with openai.AsyncOpenAI(**client_kwargs) as aclient:
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(aclient, w) for w in range(CLIENTS)))
            return records, failures, time.perf_counter() - start

    references = asyncio.run(alone())
    records, failures, elapsed = asyncio.run(load())

    assert not failures, failures[:5]
    assert len(records) >= CLIENTS
    mismatches = [
        (specs[i], text, references[i])
        for i, text, finish, _, _ in records
        if (text, finish) != references[i]
    ]
    assert not mismatches, mismatches[:3]
    assert all(finish in ("stop", "length") for _, _, finish, _, _ in records)
    assert all(tokens is not None for *_, tokens in records)

    assert wait_until(lambda: engine_idle(state), timeout=30)
    after = parse_metrics(httpx.get(metrics_url).text)
    sent = len(records) + len(specs)
    counted = sum(
        metric(after, "jaxlora_requests_total", model=m)
        - metric(before, "jaxlora_requests_total", model=m)
        for m in MODELS
    )
    finished = sum(
        metric(after, "jaxlora_requests_finished_total", model=m, finish_reason=r)
        - metric(before, "jaxlora_requests_finished_total", model=m, finish_reason=r)
        for m in MODELS
        for r in ("stop", "length")
    )
    assert counted == finished == sent
    assert state.engine.kv.free_pages == kv_free
    assert state.adapters.stats().referenced == 0
    state.adapters.evict_all_unused()
    assert all(u.used_pages == 0 for u in state.adapters.stats().pools.values())

    ttfts = sorted(r[3] for r in records)
    tokens = sum(r[4] for r in records)
    print(
        f"\nload: {len(records)} streamed requests from {CLIENTS} clients in {elapsed:.1f} s, "
        f"{tokens / elapsed:.0f} generated tokens/s, client TTFT p50 "
        f"{statistics.median(ttfts) * 1e3:.0f} ms p99 "
        f"{ttfts[int(0.99 * (len(ttfts) - 1))] * 1e3:.0f} ms, "
        f"{state.engine.stats.preemptions} preemptions"
    )

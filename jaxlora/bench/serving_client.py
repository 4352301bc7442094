"""A load-test client for OpenAI-compatible servers (vLLM's benchmark_serving, for ours or any):
a trace's requests sent to ``/v1/completions`` at their arrival times, streamed, and timed.

No JAX here (numpy and httpx only): the client runs in a process of its own beside the server it
measures, so its own Python work never holds the server's interpreter lock.

Each request is a token-id prompt (OpenAI's array form: no tokenizer needed on the client),
greedy, ``ignore_eos`` (vLLM's; the output length is the trace's), ``max_tokens`` its output
length, streamed with the usage in the last chunk (``stream_options.include_usage``) and the
token ids of each chunk (``return_token_ids``, vLLM's and ours), so a chunk whose tokens end
inside a multi-byte character (no text yet) still counts as content.

Per request: the time to its first content chunk from its arrival (TTFT), the gaps between its
content chunks (ITL: a chunk may carry several tokens when the server's stream polls found
several), the time per output token after the first (TPOT), its end-to-end latency, and its
tokens from the usage chunk. ``summarize`` turns them into the online section's row fields.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientRequest:
    """One request of a trace: sent ``arrival_s`` after the trace starts, to ``model`` (the base
    model's served name or an adapter's)."""

    index: int
    arrival_s: float
    model: str
    prompt: list[int]
    max_tokens: int


def request_body(request: ClientRequest) -> dict:
    return {
        "model": request.model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


async def _send(client, url: str, request: ClientRequest, origin: float, headers: dict) -> dict:
    import httpx

    await asyncio.sleep(max(0.0, origin + request.arrival_s - time.monotonic()))
    sent = time.monotonic()
    chunk_times: list[float] = []
    usage, error = None, None
    try:
        async with client.stream(
            "POST", f"{url}/completions", json=request_body(request), headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {body[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.monotonic()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                        break
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if any(c.get("text") or c.get("token_ids") for c in chunk.get("choices", ())):
                        chunk_times.append(now - origin)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    return {
        "index": request.index,
        "arrival_s": request.arrival_s,
        "sent_s": sent - origin,
        "end_s": time.monotonic() - origin,
        "chunk_times": chunk_times,
        "max_tokens": request.max_tokens,
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "completion_tokens": usage.get("completion_tokens") if usage else None,
        "error": error,
    }


async def _run(url, requests, api_key, timeout_s, max_connections) -> tuple[list[dict], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        origin = time.monotonic() + 0.05  # (every task scheduled before the first is due)
        results = await asyncio.gather(
            *(_send(client, url.rstrip("/"), r, origin, headers) for r in requests)
        )
    return list(results), origin


def run_client(
    url: str,
    requests: list[ClientRequest],
    *,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    max_connections: int = 4096,
) -> list[dict]:
    """Sends every request at its arrival time (``url``: the server's /v1 base) and returns one
    result a request (see the module docstring), times in seconds from the trace's start."""
    results, _ = asyncio.run(_run(url, requests, api_key, timeout_s, max_connections))
    return results


def _percentile(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def latency_fields(ttft, tpot, latency, *, requests: int, slo_s: float) -> dict:
    """A trace row's latency fields (the online and serving sections'): first-token latency
    percentiles (s), time per output token (ms), mean end-to-end latency (s), and the share of
    all ``requests`` whose first token came within slo_s."""
    return {
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p90_s": _percentile(ttft, 90),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_ms_median": statistics.median(tpot) * 1e3 if tpot else float("nan"),
        "tpot_ms_mean": statistics.fmean(tpot) * 1e3 if tpot else float("nan"),
        "latency_s_mean": statistics.fmean(latency) if latency else float("nan"),
        "slo_attainment": sum(t <= slo_s for t in ttft) / requests if requests else 0.0,
    }


def summarize(results: list[dict], slo_s: float) -> dict:
    """The online section's row fields (throughput, TTFT percentiles, TPOT, SLO) of a client
    run, plus the inter-chunk gaps. A request counts as finished when it got all its
    max_tokens without an error."""
    done = [
        r
        for r in results
        if r["error"] is None and r["completion_tokens"] == r["max_tokens"] and r["chunk_times"]
    ]
    ttft = [r["chunk_times"][0] - r["arrival_s"] for r in done]
    tpot = [
        (r["chunk_times"][-1] - r["chunk_times"][0]) / (r["completion_tokens"] - 1)
        for r in done
        if r["completion_tokens"] > 1
    ]
    gaps = [float(g) for r in done for g in np.diff(r["chunk_times"])]
    chunks = sum(len(r["chunk_times"]) for r in done)
    out_tokens = sum(r["completion_tokens"] for r in done)
    elapsed = max((r["end_s"] for r in done), default=float("nan"))
    errors = [r["error"] for r in results if r["error"] is not None]
    return {
        "requests": len(results),
        "finished": len(done),
        "unfinished": len(results) - len(done),
        "errors": len(errors),
        "first_errors": errors[:3],
        "elapsed_s": elapsed,
        "throughput_rps": len(done) / elapsed if done else 0.0,
        "output_tokens_per_s": out_tokens / elapsed if done else 0.0,
        **latency_fields(
            ttft,
            tpot,
            [r["end_s"] - r["arrival_s"] for r in done],
            requests=len(results),
            slo_s=slo_s,
        ),
        "itl_ms_p50": _percentile(gaps, 50) * 1e3,
        "itl_ms_p99": _percentile(gaps, 99) * 1e3,
        "tokens_per_chunk": out_tokens / chunks if chunks else float("nan"),
    }


def load_requests(path: str) -> list[ClientRequest]:
    with open(path) as f:
        return [ClientRequest(**r) for r in json.load(f)]


def save_requests(path: str, requests: list[ClientRequest]) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in requests], f)


def trace_requests(
    trace, model_of, *, vocab_size: int, seed: int = 0, prefix_len: int = 0
) -> list[ClientRequest]:
    """The ClientRequests of a trace (``workloads.synthetic_trace``), with the prompts the online
    section's engine gets (``workloads.trace_prompt``); model_of(adapter index): its model name."""
    from .workloads import trace_prompt

    return [
        ClientRequest(
            index=item.index,
            arrival_s=item.arrival_s,
            model=model_of(item.adapter),
            prompt=trace_prompt(item, vocab_size, seed=seed, prefix_len=prefix_len),
            max_tokens=item.output_len,
        )
        for item in trace
    ]


def main(argv: list[str]) -> int:
    """``python -m jaxlora.bench.serving_client URL REQUESTS_JSON RESULTS_JSON``: the client of
    an in-process serving benchmark (jaxlora.bench.serving), in a process of its own; the API
    key, if any, from $JAXLORA_BENCH_API_KEY."""
    import os

    if len(argv) != 3:
        print("usage: python -m jaxlora.bench.serving_client URL REQUESTS_JSON RESULTS_JSON")
        return 2
    url, requests_path, results_path = argv
    results = run_client(
        url, load_requests(requests_path), api_key=os.environ.get("JAXLORA_BENCH_API_KEY")
    )
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

"""Offline batches in OpenAI's batch file format (vLLM's ``run_batch``): a JSONL file of
requests in, a JSONL file of answers out, every request sent to a running server.

Each input line is ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions" | "/v1/responses", "body": {...}}``. Each output line, in the input's order,
is ``{"id": "batch_req_...", "custom_id": ..., "response": {"status_code": ..., "request_id":
..., "body": {...}}, "error": null}``; a request the server refused carries its error answer as
the body and ``error: {"code", "message"}``, and a line that is not a request (bad JSON, another
method or URL, ``stream``) gets a 400 of its own. A bad line never stops the batch. Requests for
different adapters run together, as many at once as ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable

import httpx

from jaxlora.errors import ConfigError
from jaxlora.server.errors import error_payload

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _line_error(custom_id, message: str, status: int = 400, body: dict | None = None) -> dict:
    body = body or error_payload(status, message, type_="invalid_request_error")
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {"message": message}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": None, "body": body},
        "error": {"code": error.get("code") or str(status), "message": error.get("message")},
    }


def _request_of(index: int, line: str) -> tuple[object, str, dict] | dict:
    """(custom_id, url, body) of an input line, or the output line of a line that is not a
    request."""
    where = f"line {index + 1}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return _line_error(None, f"{where}: not JSON ({e.msg})")
    if not isinstance(item, dict):
        return _line_error(None, f"{where}: expected an object, got {type(item).__name__}")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        return _line_error(custom_id, f"{where}: custom_id: expected a string, got {custom_id!r}")
    if item.get("method", "POST") != "POST":
        return _line_error(custom_id, f"{where}: method: expected 'POST', got {item['method']!r}")
    url = item.get("url")
    if url not in URLS:
        return _line_error(custom_id, f"{where}: url: expected one of {list(URLS)}, got {url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return _line_error(custom_id, f"{where}: body: expected an object, got {body!r}")
    if body.get("stream"):
        return _line_error(custom_id, f"{where}: body.stream: a batch answers whole, not streamed")
    return custom_id, url, body


async def _answer(client: httpx.AsyncClient, custom_id, url: str, body: dict) -> dict:
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as e:
        return _line_error(custom_id, f"the server did not answer ({type(e).__name__}: {e})", 502)
    try:
        answer = response.json()
    except json.JSONDecodeError:
        answer = {"error": {"message": response.text, "code": str(response.status_code)}}
    if response.status_code != 200:
        return _line_error(custom_id, response.text, response.status_code, answer)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": answer.get("id"),
            "body": answer,
        },
        "error": None,
    }


async def _run(
    base_url: str,
    api_key: str | None,
    lines: list[str],
    write,
    max_concurrency: int,
    timeout_s: float,
) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency)
    done: dict[int, dict] = {}
    written = failed = 0

    def flush() -> None:  # (what is answered, in the input's order)
        nonlocal written, failed
        while written in done:
            answer = done.pop(written)
            failed += answer["error"] is not None
            write(json.dumps(answer, ensure_ascii=False))
            written += 1

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as client:

        async def one(index: int, line: str) -> None:
            parsed = _request_of(index, line)
            if not isinstance(parsed, dict):
                async with limit:
                    parsed = await _answer(client, *parsed)
            done[index] = parsed
            flush()

        await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
    return failed


def run_batch(
    base_url: str,
    lines: Iterable[str],
    write,
    *,
    api_key: str | None = None,
    max_concurrency: int = 64,
    timeout_s: float = 3600.0,
) -> int:
    """Sends the batch's input lines (blank ones skipped) to the server at ``base_url`` and
    gives ``write`` each output line (JSON text) in the input's order as soon as it and those
    before it are answered; returns how many requests failed."""
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ConfigError(
            f"run_batch: max_concurrency: expected an int >= 1, got {max_concurrency!r}"
        )
    requests = [line for line in lines if line.strip()]
    return asyncio.run(_run(base_url, api_key, requests, write, max_concurrency, timeout_s))


__all__ = ["URLS", "run_batch"]

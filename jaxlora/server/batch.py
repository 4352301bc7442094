"""Offline batches in OpenAI's batch file format (vLLM's ``run_batch``): a JSONL file of
requests in, a JSONL file of answers out, every request sent to a running server.

Each input line is ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions" | "/v1/responses", "body": {...}}``. Each output line, in the input's order,
is ``{"id": "batch_req_...", "custom_id": ..., "response": {"status_code": ..., "request_id":
..., "body": {...}}, "error": null}``; a request the server refused carries its error answer as
the body and ``error: {"code", "message"}``, and a line that is not a request (bad JSON, another
method or URL, ``stream``) gets a 400 of its own. A bad line never stops the batch. Requests for
different adapters run together, as many at once as ``max_concurrency``; the input is read as
the answers go out, never whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


def _request_of(number: int, line: str | bytes) -> tuple[object, str, dict] | dict:
    """(custom_id, url, body) of input line ``number`` (from 1), or the output line of a line
    that is not a request."""
    where = f"line {number}"
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return _line_error(None, f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
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


@dataclasses.dataclass(frozen=True)
class BatchCounts:
    requests: int  # input lines that were not blank, each answered by one output line
    failed: int  # of which got an error


async def _run(
    base_url: str,
    api_key: str | None,
    lines: Iterable[str | bytes],
    write,
    max_concurrency: int,
    max_ahead: int,
    timeout_s: float,
) -> BatchCounts:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    in_flight = asyncio.Semaphore(max_concurrency)
    # Lines read but not yet written out: bounds what a slow early answer makes the later ones
    # wait in memory for, so a file of any size streams through.
    ahead = asyncio.Semaphore(max_ahead)
    done: dict[int, dict] = {}
    written = failed = 0
    errors: list[BaseException] = []

    def flush() -> None:  # (what is answered, in the input's order)
        nonlocal written, failed
        while written in done:
            answer = done.pop(written)
            failed += answer["error"] is not None
            write(json.dumps(answer, ensure_ascii=False))
            written += 1
            ahead.release()

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as client:

        async def one(index: int, number: int, line: str | bytes) -> None:
            parsed = _request_of(number, line)
            if not isinstance(parsed, dict):
                async with in_flight:
                    parsed = await _answer(client, *parsed)
            done[index] = parsed
            flush()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # (write failed: the batch stops)
                ahead.release()  # (the reading loop may wait for a line that is not written)

        tasks: set[asyncio.Task] = set()
        index = 0
        requests = ((number, line) for number, line in enumerate(lines, 1) if line.strip())
        while True:
            await ahead.acquire()  # (before reading: the window counts the line being read)
            numbered = None if errors else next(requests, None)
            if numbered is None:
                break
            task = asyncio.create_task(one(index, *numbered))
            tasks.add(task)
            task.add_done_callback(finished)
            index += 1
        while tasks and not errors:
            await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        if errors:
            raise errors[0]
    return BatchCounts(requests=index, failed=failed)


def run_batch(
    base_url: str,
    lines: Iterable[str | bytes],
    write,
    *,
    api_key: str | None = None,
    max_concurrency: int = 64,
    max_ahead: int | None = None,
    timeout_s: float = 3600.0,
) -> BatchCounts:
    """Sends the batch's input lines (blank ones skipped) to the server at ``base_url`` and
    gives ``write`` each output line (JSON text) in the input's order as soon as it and those
    before it are answered. ``lines`` (text, or bytes decoded as UTF-8: a line that is not gets
    its error) is read as the batch goes (an open file streams): at most
    ``max_ahead`` lines (default 16 x ``max_concurrency``) are read beyond the last one
    written."""
    for field, value in (("max_concurrency", max_concurrency), ("max_ahead", max_ahead)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"run_batch: {field}: expected an int >= 1, got {value!r}")
    ahead = max_ahead if max_ahead is not None else 16 * max_concurrency
    return asyncio.run(_run(base_url, api_key, lines, write, max_concurrency, ahead, timeout_s))


__all__ = ["URLS", "BatchCounts", "run_batch"]

"""From engine requests to the event loop: one poller for every open request, and the group of
requests (prompts x choices) that one HTTP call made.

The engine thread pushes each request's deltas into the request's own thread-safe queue and
names the request in the pump's ready list (``Request.on_push``: a deque's append). Rather than
one coroutine per request polling its queue (tens of thousands of wake-ups a second with a few
hundred open streams), one ``DeltaPump`` task, each ``poll_s``, drains the queues of the
requests named since its last pass (not every open request's: an empty queue's check cost as
much as a delta's delivery) and hands the deltas to the asyncio queue of the HTTP call that
owns the request.

With ``stream_interval`` n > 1 a request's deltas are held until they carry n tokens (or its
finish) and handed over as one (``merge_deltas``): a stream then sends one chunk per n tokens
or more (those the engine made between two passes) instead of one a token, which costs the
server's thread (shared with the engine's host work) about n times less a token. A request's
first delta is never held (its first token goes out as soon as it is made); the tokens held
wait for the next ones, so a request that stalls (e.g. preempted) sends them only when it goes
on or ends.

A group that is abandoned (client gone, error) cancels its unfinished requests; the pump keeps
watching them until the engine reports them finished (their KV pages and adapter references are
freed by then), so that metrics count them too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable

from jaxlora.engine import Delta, Engine, Request

log = logging.getLogger("jaxlora.server")


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One delta for several consecutive deltas of a request: their tokens, text and logprobs
    in order; the first one's prompt logprobs; the last one's finish (``last`` if any was)."""
    if len(deltas) == 1:
        return deltas[0]
    first, end = deltas[0], deltas[-1]
    logprobs = [d.logprobs for d in deltas]
    tops = [d.top_logprobs for d in deltas]
    return Delta(
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        logprobs=None
        if all(x is None for x in logprobs)
        else [v for x in logprobs for v in x or ()],
        top_logprobs=None if all(x is None for x in tops) else [v for x in tops for v in x or ()],
        finish_reason=end.finish_reason,
        error=end.error,
        last=any(d.last for d in deltas),
        prompt_logprobs=first.prompt_logprobs,
        prompt_top_logprobs=first.prompt_top_logprobs,
    )


class DeltaPump:
    """Moves deltas from engine requests to asyncio queues; on_finish(request) at each end.
    stream_interval: tokens a delivered delta carries at least, its request's first and last
    apart (see the module docstring; 1: each delta as the engine made it)."""

    def __init__(
        self, poll_s: float, on_finish: Callable[[Request], None], *, stream_interval: int = 1
    ):
        self._poll_s = poll_s
        self._on_finish = on_finish
        self._interval = stream_interval
        # request -> the deltas held back for it (stream_interval > 1) and their tokens; the
        # requests that had a delta delivered
        self._held: dict[Request, tuple[list[Delta], int]] = {}
        self._delivered: set[Request] = set()
        # request -> (queue of the HTTP call, its choice index); queue None once abandoned.
        self._watched: dict[Request, tuple[asyncio.Queue | None, int]] = {}
        # requests given deltas since the last pass (appended on the engine's thread; a
        # request may be named more than once)
        self._ready: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    @property
    def open_requests(self) -> int:
        """Requests not yet seen finished (abandoned ones included)."""
        return len(self._watched)

    @property
    def cancelling(self) -> int:
        """Requests whose client is gone, not yet ended by the engine."""
        return sum(1 for target, _ in self._watched.values() if target is None)

    def watch(self, request: Request, target: asyncio.Queue, index: int) -> None:
        self._watched[request] = (target, index)
        request.on_push = self._ready.append
        self._ready.append(request)  # (deltas given before on_push was set)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="jaxlora-delta-pump"
            )
        self._wake.set()

    def abandon(self, request: Request) -> None:
        """Nobody reads this request any more; keep watching it until the engine ends it."""
        if request in self._watched:
            self._watched[request] = (None, self._watched[request][1])

    def _pump_once(self) -> None:
        for _ in range(len(self._ready)):  # (those named before this pass: the next takes
            request = self._ready.popleft()  # any named meanwhile)
            watched = self._watched.get(request)
            if watched is None:  # (finished, or named twice and drained to its end)
                continue
            target, index = watched
            deltas = request.take_deltas()
            if not deltas:
                continue
            ended = deltas[-1].finish_reason is not None
            if target is not None:
                for delta in self._due(request, deltas, ended):
                    target.put_nowait((index, delta))
            if ended:
                del self._watched[request]
                self._held.pop(request, None)
                self._delivered.discard(request)
                request.on_push = None
                try:
                    self._on_finish(request)
                except Exception:  # bookkeeping must never stall every open stream
                    log.exception("on_finish failed for %s", request.request_id)

    def _due(self, request: Request, deltas: list[Delta], ended: bool) -> list[Delta]:
        """The deltas to deliver now (stream_interval: the rest are held for the next pass)."""
        if self._interval == 1:
            return deltas
        held, tokens = self._held.pop(request, ([], 0))
        held.extend(deltas)
        tokens += sum(len(d.token_ids) for d in deltas)
        if ended or tokens >= self._interval or request not in self._delivered:
            self._delivered.add(request)
            return [merge_deltas(held)]
        self._held[request] = (held, tokens)
        return []

    async def _run(self) -> None:
        while True:
            if not self._watched:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._pump_once()
            await asyncio.sleep(self._poll_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class RequestGroup:
    """The engine requests of one HTTP call (choice i = requests[i]) and their merged deltas."""

    def __init__(self, engine: Engine, pump: DeltaPump):
        self.engine = engine
        self.pump = pump
        self.requests: list[Request] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open: set[int] = set()

    def add(self, request: Request) -> None:
        index = len(self.requests)
        self.requests.append(request)
        self._open.add(index)
        self.pump.watch(request, self._queue, index)

    @property
    def finished(self) -> bool:
        return not self._open

    async def next_event(self, timeout: float | None = None) -> tuple[int, Delta] | None:
        """The next (choice index, delta); None after timeout seconds without one."""
        if timeout is None:  # (asyncio.wait_for's timeout scope costs more than the get)
            index, delta = await self._queue.get()
        else:
            try:
                index, delta = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
        if delta.finish_reason is not None:
            self._open.discard(index)
        return index, delta

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        while not self.finished:
            event = await self.next_event()
            if event is not None:
                yield event

    def cancel(self) -> None:
        """Cancels every unfinished request (their pages are freed at the next engine step)."""
        for index in sorted(self._open):
            request = self.requests[index]
            self.engine.cancel(request.request_id)
            self.pump.abandon(request)
        self._open.clear()

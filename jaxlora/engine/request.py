"""A generation request as the engine tracks it, and what it streams back."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import queue
import threading
import time
from collections.abc import Callable

from jaxlora.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no KV pages yet
    RUNNING = "running"  # holds KV pages and an adapter reference
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller (e.g. the client disconnected)
    DEADLINE = "deadline"  # admission control: its deadline could no longer be met
    ERROR = "error"  # the adapter failed to load, ...


@dataclasses.dataclass
class Delta:
    """What one engine iteration added to a request: new tokens, their text, and the end."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Its token is the request's last: the finish follows in a delta of its own, pushed in the
    # same engine iteration (a stream that must put the end on a token waits for it only then).
    last: bool = False
    # The first delta of a request that asked for prompt logprobs: one entry a prompt token
    # (None for the first, which has no context).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


_END = object()


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    deadline: float | None = None  # monotonic time by which the first token must be out
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    # vLLM's: lower is served first (EngineConfig.scheduling_policy "priority"; 0 otherwise).
    priority: int = 0

    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    # SamplingParams.prompt_logprobs: each prompt token's logprob given the tokens before it
    # (None for the first) and its alternatives; None when not asked for.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None  # 1 + the tokens more likely
    text: str = ""
    num_computed: int = 0  # tokens whose K/V are in the cache (or being written by a step)
    # Tokens sampled by dispatched steps whose values the host has not read yet (async
    # scheduling), and where the newest of them sits in the engine's device token register.
    inflight: int = 0
    inflight_src: int = -1
    epoch: int = 0  # bumped on preemption: results of steps dispatched before are dropped
    finish_reason: FinishReason | None = None
    # vLLM's: the stop token id (stop_token_ids) or stop string that ended the output; None
    # where it ended otherwise (EOS, a finished structured output, max_tokens, an error)
    stop_reason: int | str | None = None
    error: str | None = None
    # The error is the request's own fault, not the engine's (its structured output's grammar
    # passed a limit of llguidance's while it ran): a server answers it as a bad request.
    error_is_request: bool = False
    adapter_handle: object | None = None
    preemptions: int = 0
    skipped: int = 0  # times a later request was admitted first (fairness bound)
    admitted_time: float | None = None  # first admission (a preempted request keeps it)
    # Prompt tokens whose K/V its first admission found computed, by the prefix cache or its
    # prompt leader (vLLM's num_cached_tokens; a recompute after preemption does not change it).
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    cancel_requested: bool = False
    # False: the request is waited on, not streamed (LLM.generate, the benchmarks): only the
    # end is queued. A delta a token (and its token list) that no one reads would stay alive
    # until the request is dropped, and every full garbage collection would scan it: in the
    # online benchmark's trace (~110k tokens) such collections took 129-214 ms on the GPU
    # machine's CPU, a stall every in-flight request waits for.
    stream_deltas: bool = True
    _detok_state: object | None = None  # tokenizer.IncrementalDecoder
    _stop_detector: object | None = None  # sampling.StopStringDetector
    _prompt_unique: object | None = None  # the prompt's distinct tokens (logit processing)
    # Another request of the same prompt and adapter (an earlier choice of the same call)
    # whose prompt pages this one takes instead of computing them (Engine.submit).
    prompt_leader: Request | None = None
    # A structured output's matcher and where its grammar starts (structured_output.GrammarGate):
    # has taken exactly output_ids
    _grammar: object | None = None
    _bad_words: object | None = None  # jaxlora.bad_words.BadWords
    fair_charged: bool = False  # its prompt counted in its tenant's service (engine policy 9)
    tenant: str = ""  # whose share of service it counts in (policy 9; Engine.submit's tenant)
    _allowed_tokens: object | None = None  # (words,) int32 bitmask of allowed_token_ids
    # Called with the request after each delta it is given (on the engine's thread): how a
    # consumer of many requests learns which have news without polling every queue (the
    # server's DeltaPump). It must be cheap and thread-safe, e.g. a deque's append.
    on_push: Callable[[Request], None] | None = None

    @property
    def masks_after_previous_token(self) -> bool:
        """Whether the sampler's token bitmask for this request depends on its previous
        token (a structured output, or bad words of several tokens), which the host must read
        first (engine policy 6)."""
        return self._grammar is not None or (
            self._bad_words is not None and not self._bad_words.static
        )

    def __post_init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()

    @property
    def rank(self) -> tuple[int, float]:
        """Scheduling order under priorities: the smaller is served first and preempted
        last (its priority, then its arrival)."""
        return (self.priority, self.arrival)

    @property
    def sequence_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, n: int) -> list[int]:
        """(prompt_ids + output_ids)[start:start + n] without building the whole sequence."""
        prompt = len(self.prompt_ids)
        if start + n <= prompt:
            return self.prompt_ids[start : start + n]
        if start >= prompt:
            return self.output_ids[start - prompt : start - prompt + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - prompt]

    @property
    def scheduled_len(self) -> int:
        """The sequence once the tokens being sampled on the device are in."""
        return self.sequence_len + self.inflight

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return self.scheduled_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    # -- streaming (engine thread -> consumers) -------------------------------------------------
    def push(self, delta: Delta) -> None:
        if not self.stream_deltas and delta.finish_reason is None:
            return
        self._queue.put(delta)
        if delta.finish_reason is not None:
            self._queue.put(_END)
            self._done.set()
        on_push = self.on_push
        if on_push is not None:
            on_push(self)

    def take_deltas(self) -> list[Delta]:
        """Every delta given so far and not yet taken, without blocking (up to the last one,
        which has a finish_reason)."""
        deltas = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return deltas
            if item is _END:
                return deltas
            deltas.append(item)

    def stream(self, timeout: float | None = None):
        """Blocking iterator over deltas until the request finishes."""
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                return
            yield item

    async def astream(self):
        """Async iterator over deltas (the server's streaming responses)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.002)
                continue
            if item is _END:
                return
            yield item

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

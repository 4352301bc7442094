"""The serving engine: iteration-level continuous batching of requests for any mix of adapters.

Scheduling policy (one iteration):

1. Finish what was cancelled, and abort (reason ``deadline``) every request still without its
   first token, waiting or admitted (adapter loading, prompt half prefilled), whose first-token
   deadline has passed or can no longer be met: its own prefill chunks plus the iterations the
   prompt tokens ahead of it need, at the measured step time (S-LoRA's early abort).
2. Admit waiting requests first-come first-served while batch rows, KV pages and adapter slots
   allow. A request that cannot be admitted (its adapter's pages are all held, or the step's
   adapter slots are full of other adapters) may be overtaken by later requests, but at most
   ``max_skips`` times; after that nothing behind it is admitted until it is (the fairness bound:
   no request and no adapter starves under a skewed load). Past the bound, where the request at
   it waits for its adapter's pages, the waiting requests that already hold their own adapter
   (refused for KV pages after acquiring it, or preempted) still go: the pages it waits for
   may be theirs, and only running frees them. A request whose adapter cannot fit beside the
   pinned adapters ever is finished with an error rather than waited for. A request whose
   adapter is still being copied to the GPU holds its place but does not block others.
3. Decode rows (one token each) go first; prompts are prefilled in chunks of at most
   ``prefill_chunk`` tokens within the remaining token budget, so a long prompt never stalls the
   running decodes.
4. When the KV pool runs out, the most recently arrived running request that is newer than the
   one needing pages is preempted, one not yet scheduled in this iteration if there is one, or
   else the requester itself (an older request is never preempted for a newer one, and none is
   preempted where all the newer ones' pages would not do: then the requester is): its pages
   are freed and it re-queues at the front; it later recomputes its prompt and the tokens it had
   generated, and continues with identical output (sampling keys depend only on the request's
   seed and the token index).
5. Async scheduling (``EngineConfig.async_scheduling``, on by default): an iteration dispatches
   its steps first and only then reads the tokens of the previous iteration's steps, so the
   device always has the next step queued while the host reads tokens, streams and schedules. A
   decode row whose input token is still being sampled reads it on the device from the token
   register that the previous iteration's samplers wrote (``StepBatch.token_src``). Lengths are
   known ahead (max_tokens, the context), so a request is never fed past them; a stop found in
   a token (EOS, a stop token or string) is seen one iteration late, and the row computed
   meanwhile is dropped. Outputs are the synchronous engine's.
6. Structured outputs (``SamplingParams.structured_output``): a constrained row's sampler takes
   the bitmask of the tokens its grammar allows next, which needs its previous token on the
   host. So an iteration with a constrained row dispatches its model steps first, then reads
   the previous iteration's tokens (while the device runs those steps), then computes the
   masks and dispatches the samplers: the row decodes every iteration and the device stays
   fed. Its matcher consumes each token appended; when the grammar can take nothing more the
   request stops. A grammar after reasoning (``SamplingParams.reasoning_tokens``) lets every
   token through until the closing tag; its row waits all the same, since whether the tag has
   closed depends on the previous token. Bad words (``SamplingParams.bad_words``,
   ``jaxlora.bad_words``) ban tokens through the same bitmask, so their rows follow the same
   order where a word has several tokens (one-token bans are the same every step).
7. Shared prompts (``Engine.submit(share_prompt_with=...)``: the n choices of one call): a
   request whose leader, a running request of the same prompt and adapter version, is still
   computing the prompt's full pages waits for them (holding its place, blocking nobody), then
   starts with those pages by reference and computes only the rest of its prompt (at least its
   last token). A leader that is not running (finished, preempted) is not waited for.
8. Priorities (``EngineConfig.scheduling_policy="priority"``, ``Engine.submit(priority=...)``,
   vLLM's: lower is served first). Waiting requests are admitted in priority order (arrival
   order within a priority; policy 2's fairness bound holds among them). Preemption (4) takes
   the running request of the lowest priority, the newest among equals, and never one that
   ranks before the requester. A waiting request that ranks before a running one of a lower
   priority and finds no batch row or KV pages preempts it (lowest first) to be admitted, as
   many as that takes, and none where preempting them all would not admit it.
   Under "fcfs" (the default) every request has priority 0 and the order is 2 and 4's.
9. Fair shares (``EngineConfig.scheduling_policy="fair"``: the Virtual Token Counter of
   Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024). Each tenant (by
   default an adapter, the base model one too; or whatever ``Engine.submit(tenant=...)``
   names, e.g. a customer's API key) has a counter of the service it got: its prompt tokens
   when a request is first admitted, twice its output tokens as they come. Waiting requests
   are admitted from the tenant of the lowest counter first (each admission counted at once,
   so one pass interleaves tenants; arrival order within a tenant and among equal counters).
   A tenant that had nothing waiting or running starts from the lowest counter among those
   that have (no credit is banked while idle), so a customer who floods the queue cannot hold
   back one who sends a few requests. A tenant of weight w (``EngineConfig.fair_share_weights``)
   is counted 1/w of its tokens: among busy tenants it gets w times the service of one of
   weight 1. Preemption (4) is unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import operator
import threading
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.bad_words import BadWords, apply_bans, bad_word_token_ids
from jaxlora.config import LoraPoolConfig, ModelConfig, is_int, require_positive_ints
from jaxlora.engine.kv_cache import KVCacheConfig, KVCacheManager
from jaxlora.engine.request import Delta, FinishReason, Request, Status
from jaxlora.engine.runner import (
    ModelRunner,
    PackedInputs,
    RunnerConfig,
    StepBatch,
    bucket,
    empty_batch,
    sample_step,
    unpack_prompt_logprobs,
    unpack_samples,
)
from jaxlora.errors import (
    ConfigError,
    JaxloraError,
    PoolExhaustedError,
    RequestError,
    UnknownAdapterError,
)
from jaxlora.sampling import (
    MAX_LOGPROBS,
    RowHistory,
    SamplingBatch,
    SamplingParams,
    StopStringDetector,
    logit_processing,
    unique_tokens,
    uses_filters,
)
from jaxlora.structured_output import GrammarGate, TokenMasks, mask_words, token_mask
from pallas_kernels import layout
from pallas_kernels.sgmv import build_sgmv_metadata, choose_per_token

log = logging.getLogger("jaxlora.engine")


def check_prompt_length(num_tokens: int, max_model_len: int) -> None:
    """Raises RequestError when a prompt of num_tokens leaves no room for one generated token."""
    if num_tokens >= max_model_len:
        raise RequestError(
            f"prompt: {num_tokens} tokens; the context length is {max_model_len}"
            f" (prompt plus at least one generated token)"
        )


def checked_token_ids(
    prompt_ids, expected: str = "prompt_ids: expected a sequence of token ids (ints)"
) -> list[int]:
    """A prompt's token ids (a sequence of ints or integer scalars, or a 1-D integer numpy or
    JAX array) as a list of ints; RequestError starting with ``expected`` for anything else:
    ``int()`` of each truncated floats to ids and split a string of digits into one token a
    digit, silently another prompt than the one given."""
    if hasattr(prompt_ids, "__array__") and not isinstance(prompt_ids, Sequence):
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise RequestError(f"{expected}, got an array of shape {ids.shape} and {ids.dtype}")
        return ids.tolist()
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes, bytearray)):
        raise RequestError(f"{expected}, got {prompt_ids!r:.100}")
    ids = [_token_id(t) for t in prompt_ids]
    if None in ids:
        raise RequestError(f"{expected}, got {prompt_ids[ids.index(None)]!r:.50} among them")
    return ids


def check_adapter_and_sampling(adapter, sampling) -> None:
    """RequestError unless adapter is an adapter's name or None and sampling a SamplingParams
    or None (a dict or a list here failed deep in the engine)."""
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(
            f"adapter: expected a registered adapter's name or None, got {adapter!r:.100}"
        )
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise RequestError(
            "sampling: expected a jaxlora.sampling.SamplingParams or None, got "
            f"{type(sampling).__name__}"
        )


def _token_id(t) -> int | None:
    """t as a token id: an int, a numpy integer or a 0-d integer array (a JAX array's elements
    are such arrays); None for a bool or anything else."""
    if isinstance(t, bool):
        return None
    try:
        return operator.index(t)
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    kv: KVCacheConfig = KVCacheConfig()
    runner: RunnerConfig = RunnerConfig()
    lora_pool: LoraPoolConfig = LoraPoolConfig()
    max_num_tokens: int = 256  # token budget of one iteration (decode rows + prefill chunks)
    max_waiting: int = 1024  # bounded queue: submit() beyond it raises (server: 503)
    max_skips: int = 8  # fairness bound, see the module docstring
    warmup: bool = True
    compile_threads: int = 8  # warm-up compiles the step shapes on this many threads
    # Dispatch each iteration's steps before reading the previous iteration's tokens: decode
    # rows take their input token from the device, so the host's work (reading the tokens,
    # streaming, scheduling, building the next batch) overlaps with the device's. A row whose
    # request turns out to have stopped (EOS, a stop string) in the previous token is computed
    # once more and dropped. Outputs are identical either way.
    async_scheduling: bool = True
    # vLLM's --scheduling-policy: "fcfs" (priorities refused), "priority" (policy 8), or
    # "fair" (policy 9: each tenant's share of service).
    scheduling_policy: str = "fcfs"
    # Policy 9's weighted shares: (tenant, weight) pairs, a tenant being an adapter's name ("":
    # the base model) or the tenant its requests are submitted with. A tenant of weight w is
    # counted 1/w of its tokens, so among busy tenants it gets w times the service of a tenant
    # of weight 1 (the default); e.g. (("premium", 4.0),).
    fair_share_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        require_positive_ints(self, ("max_num_tokens",), "engine config")
        # (a dict or None here failed at the first use, deep in the engine; max_waiting 0
        # refused every request as "the queue is full")
        for field, kind in (
            ("kv", KVCacheConfig),
            ("runner", RunnerConfig),
            ("lora_pool", LoraPoolConfig),
        ):
            if not isinstance(getattr(self, field), kind):
                raise ConfigError(
                    f"EngineConfig: field {field!r} is {getattr(self, field)!r:.100}; expected "
                    f"a {kind.__name__}"
                )
        for field, least in (("max_waiting", 1), ("max_skips", 0), ("compile_threads", 1)):
            value = getattr(self, field)
            if not is_int(value) or value < least:
                raise ConfigError(
                    f"EngineConfig: field {field!r} is {value!r}; expected an int >= {least}"
                )
        for field in ("warmup", "async_scheduling"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(
                    f"EngineConfig: field {field!r} is {getattr(self, field)!r}; expected a bool"
                )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"EngineConfig: field 'scheduling_policy' is {self.scheduling_policy!r}; "
                f"expected one of {list(SCHEDULING_POLICIES)}"
            )
        seen = set()
        for i, pair in enumerate(self.fair_share_weights):
            where = f"EngineConfig: field 'fair_share_weights[{i}]'"
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ConfigError(f"{where} is {pair!r}; expected (tenant, weight)")
            name, weight = pair
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(f"{where}: weight {weight!r} is not a number")
            if not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{where}: weight {weight!r}; expected a finite number > 0")
            if name in seen:
                raise ConfigError(f"{where}: {name!r} is weighted twice")
            seen.add(name)
        if self.fair_share_weights and self.scheduling_policy != "fair":
            raise ConfigError(
                "EngineConfig: field 'fair_share_weights' needs scheduling_policy 'fair' "
                f"(it is {self.scheduling_policy!r})"
            )


SCHEDULING_POLICIES = ("fcfs", "priority", "fair")
# Policy 9's weights of a prompt token and an output token (VTC's w_p and w_q).
FAIR_PROMPT_WEIGHT, FAIR_OUTPUT_WEIGHT = 1, 2
# Engine._try_admit's outcomes.
_ADMITTED, _NO_PAGES, _REFUSED = "admitted", "no pages", "refused"


@dataclasses.dataclass
class _SamplerInputs:
    """What a launched step's sampler needs besides the structured outputs' masks."""

    logits: jax.Array  # (B, V) float32, on the device
    params: list  # SamplingParams of the step's rows
    token_indices: list  # each row's index of the token it samples
    processing: object  # sampling.LogitProcessing or None
    batch_rows: int
    pending_register: jax.Array | None


@dataclasses.dataclass
class _Launch:
    """A dispatched step whose sampled tokens the host has not read yet."""

    mode: str
    # (B, 2 + 2n) int32, runner.unpack_samples; its copy to host started. None until the
    # sampler is dispatched (``Engine._dispatch_sampler``, from sampler_inputs).
    sampled: jax.Array | None
    rows: list  # (request, its epoch at dispatch, row) of the rows that sample a token
    # (B, S, 1 + 2n) int32, runner.unpack_prompt_logprobs, or None: no row asked for them
    prompt_logprobs: jax.Array | None = None
    # (request, row, first position, end position) of the rows that asked for them
    prompt_rows: list = dataclasses.field(default_factory=list)
    sampler_inputs: _SamplerInputs | None = None  # until the sampler is dispatched


@dataclasses.dataclass(frozen=True)
class QueueSnapshot:
    """One consistent reading of who is queued and served (``Engine.queue_snapshot``): for
    gauges read while the engine's thread runs."""

    # adapter name (None: the base model) -> requests, for adapters that have any
    waiting: dict[str | None, int]
    running: dict[str | None, int]
    waiting_by_priority: dict[int, int]
    # Policy 9: tenant (by default the adapter's name, "" for the base model) -> service
    # counted so far (prompt tokens, FAIR_OUTPUT_WEIGHT per output token, the lift from idle).
    fair_service: dict[str, float]


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    deadline_aborts: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_cached_tokens: int = 0  # sequence tokens admitted with their K/V from the cache
    shared_prompt_tokens: int = 0  # prompt tokens admitted with a leader's K/V (n choices)
    step_time_ema: float = 0.0
    requests_per_adapter: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    tokens_per_adapter: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ttft: list = dataclasses.field(default_factory=list)  # seconds, recent
    tpot: list = dataclasses.field(default_factory=list)
    # Host seconds of the iterations so far, by phase: "schedule" (poll, reap, admit,
    # schedule), "build" (a step's host arrays and adapter metadata), "dispatch" (handing the
    # step and its sampler to the device), "wait" (blocked on a step's sampled tokens) and
    # "append" (the tokens appended, streamed, stops checked). With async scheduling, an
    # iteration that waits ~0 means the device ran out of queued work: the host is the bound.
    host_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # The engine thread's CPU seconds in the same phases (``time.thread_time``): a phase whose
    # wall time is far above its CPU time was blocked (on the device, or waiting for the
    # interpreter lock that a server in the same process also takes).
    host_cpu_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def check_params(config: ModelConfig, params) -> None:
    """ConfigError naming the first parameter of ``params`` that the model of ``config`` does
    not have, lacks, or has in another shape (the canonical or the fused tree, as
    ``init_params`` and the checkpoint loaders give them; ``formats.hf.param_tree_mismatch``).
    Unchecked, parameters of another model failed at the first step, inside Flax or lax.scan."""
    from jaxlora.formats.hf import param_tree_mismatch

    if not isinstance(params, Mapping):
        raise ConfigError(
            "params: expected the model's parameter tree (a dict, as jaxlora.model.init_params "
            f"or a checkpoint loader gives it), got {type(params).__name__}"
        )
    mismatch = param_tree_mismatch(config, params)
    if mismatch is not None:
        raise ConfigError(mismatch)


def _step_params(params, config, mesh, fuse: bool):
    """The runner's parameters: on the device once (a loaded checkpoint arrives as numpy; left
    on the host, jit would copy it to the device at every step), with q|k|v and gate|up fused if
    asked. One device: host weights are fused on the host, so the device never holds both forms.
    A mesh: the weights are sharded first, then fused one tensor-parallel group per device."""
    from jaxlora.model import fuse_projections

    if mesh is not None and mesh.size > 1:
        from jaxlora.sharding import TP_AXIS, fused_projection_sharding, shard_params

        params = shard_params(params, config, mesh)
        if not fuse:
            return params
        return fuse_projections(
            params, groups=mesh.shape[TP_AXIS], sharding=fused_projection_sharding(mesh)
        )
    if fuse:
        params = fuse_projections(params)
    return jax.tree.map(lambda p: p if isinstance(p, jax.Array) else jax.device_put(p), params)


class Engine:
    """Owns the model runner, the KV cache and the scheduler; the adapter manager is shared.

    ``adapters`` is a ``jaxlora.memory.AdapterManager`` (or None: base model only).
    ``tokenizer`` (optional) turns tokens into streamed text and enables stop strings.
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        engine_config: EngineConfig | None = None,
        *,
        adapters=None,
        tokenizer=None,
        dtype=jnp.float32,
        mesh=None,
    ):
        """mesh: a `tp` mesh (jaxlora.sharding.make_mesh) for tensor parallelism; params and the
        adapter pools must already be sharded over it."""
        self.config = config
        self.engine_config = ec = engine_config or EngineConfig()
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.mesh = mesh
        runner_config = ec.runner
        kv_sharding = register_sharding = None
        if mesh is not None and mesh.size > 1:
            register_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            from jaxlora.sharding import kv_pool_sharding

            kv_sharding = kv_pool_sharding(mesh)
            # The Pallas kernels are not partitioned by GSPMD: a sharded step uses the jnp path,
            # which XLA splits over the mesh.
            runner_config = dataclasses.replace(runner_config, impl="reference")
        check_params(config, params)
        params = _step_params(params, config, mesh, runner_config.fuse_projections)
        self.runner = ModelRunner(
            config, params, runner_config, dtype=dtype, register_sharding=register_sharding
        )
        self.kv = KVCacheManager(config, ec.kv, dtype=dtype, sharding=kv_sharding)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._step_lock = threading.Lock()  # one iteration at a time (``step``)
        self._waiting: collections.deque[Request] = collections.deque()
        # Policy 9: each tenant's service counter, and the requests waiting or running of each
        # busy tenant (no entry for an idle one).
        self._service: collections.Counter = collections.Counter()
        self._fair_weight = dict(ec.fair_share_weights)  # tenant -> weight (absent: 1)
        self._tenant_requests: collections.Counter = collections.Counter()
        self._running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        # What _reap looks for, so that it walks the running and waiting requests only when
        # there is something to find: the cancelled requests not yet finished, and those given
        # a first-token deadline (with a flooded queue the walks took ~1 ms an iteration).
        self._cancelled: set[Request] = set()
        self._deadline_requests: set[Request] = set()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._seed_rng = np.random.default_rng()
        self._register = self.runner.empty_register  # the tokens the last iteration sampled
        self._pending: list[_Launch] = []  # async scheduling: steps not read back yet
        self.async_scheduling = ec.async_scheduling  # may be switched between iterations
        self.eos_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self._token_masks: TokenMasks | None = None  # built for the first structured output
        self._token_masks_lock = threading.Lock()
        if ec.warmup:
            self.warmup()

    # -- public API -----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
        deadline_s: float | None = None,
        stream: bool = True,
        share_prompt_with: Request | None = None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> Request:
        """Queues a request; returns it at once (stream its deltas or wait on it). stream=False:
        only the final delta is queued (``Request.stream_deltas``), for callers that wait.
        share_prompt_with: a request submitted before, of the same prompt and adapter, whose
        prompt pages this one takes instead of computing them (policy 7). priority: lower is
        served first, under the "priority" scheduling policy only (policy 8). tenant: whose
        share of service the request counts in under the "fair" policy (policy 9; default: its
        adapter's, "" for the base model), e.g. a customer's API key name."""
        prompt_ids = checked_token_ids(prompt_ids)
        check_adapter_and_sampling(adapter, sampling)
        sampling = sampling or SamplingParams()
        if sampling.truncate_prompt_tokens is not None:  # (vLLM's left truncation)
            keep = sampling.truncate_prompt_tokens
            prompt_ids = prompt_ids[
                -(self.engine_config.kv.max_model_len if keep == -1 else keep) :
            ]
        if sampling.n != 1:
            raise RequestError(
                f"sampling parameter 'n': a request is one sample, expected 1, got {sampling.n} "
                "(LLM.generate and LLM.chat run n samples as n requests sharing the prompt)"
            )
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(f"request_id: expected a string or None, got {request_id!r:.100}")
        if share_prompt_with is not None and not isinstance(share_prompt_with, Request):
            raise RequestError(
                "share_prompt_with: expected a Request or None (one this engine's submit "
                f"returned), got {type(share_prompt_with).__name__}"
            )
        if tenant is not None and not isinstance(tenant, str):
            raise RequestError(f"tenant: expected a string, got {tenant!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise RequestError(f"priority: expected an int, got {priority!r}")
        if deadline_s is not None and (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, (int, float))
            or math.isnan(deadline_s)
        ):
            # (a NaN deadline never passed, a string failed deep in the scheduler)
            raise RequestError(f"deadline_s: expected a number of seconds, got {deadline_s!r}")
        if priority and self.engine_config.scheduling_policy != "priority":
            raise RequestError(
                f"priority: {priority} needs the 'priority' scheduling policy; this engine "
                f"schedules by {self.engine_config.scheduling_policy!r} (expected 0)"
            )
        if not prompt_ids:
            raise RequestError("prompt: expected at least one token, got an empty prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(
                f"prompt: token id {bad[0]} is outside the vocabulary "
                f"0..{self.config.vocab_size - 1}"
            )
        sampling.check_vocab(self.config.vocab_size)
        if sampling.stop_strings and self.tokenizer is None:
            raise RequestError(
                "stop: stop strings need a tokenizer to match text against, and "
                "this engine has none; use stop_token_ids"
            )
        grammar = None
        if sampling.structured_output is not None:
            matcher = self.token_masks(sampling.structured_output.field).matcher(
                sampling.structured_output
            )
            if sampling.reasoning_tokens is not None:
                sampling.reasoning_tokens.check_vocab(self.config.vocab_size)
            grammar = GrammarGate(matcher, sampling.reasoning_tokens)
        bad_words = None
        if sampling.bad_words:
            if self.tokenizer is None:
                raise RequestError(
                    "bad_words: bad words are tokenized, and this engine has no tokenizer"
                )
            bad_words = BadWords(
                bad_word_token_ids(self.tokenizer, sampling.bad_words), self.config.vocab_size
            )
        limit = self.engine_config.kv.max_model_len
        check_prompt_length(len(prompt_ids), limit)
        if len(prompt_ids) + sampling.max_tokens > limit:
            raise RequestError(
                f"max_tokens: {sampling.max_tokens} plus the prompt's "
                f"{len(prompt_ids)} tokens exceeds the context length {limit}"
            )
        pool = self.engine_config.kv.num_pages

        def pages_held(tokens: int) -> int:
            return self.kv.pages_held_at_most(
                tokens, self.config.attention_window, self.engine_config.runner.prefill_chunk
            )

        if pages_held(len(prompt_ids) + 1) > pool:
            raise RequestError(
                f"prompt: {len(prompt_ids)} tokens need more KV pages than the pool has ({pool})"
            )
        # (alone in the engine it would preempt itself at the pool's end and recompute, forever)
        held = pages_held(len(prompt_ids) + sampling.max_tokens)
        if held > pool:
            raise RequestError(
                f"max_tokens: {sampling.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                f"need {held} KV pages; the pool has {pool}"
            )
        if adapter is not None:
            if self.adapters is None or adapter not in self.adapters.store:
                raise UnknownAdapterError(f"adapter {adapter!r} is not registered")
        if share_prompt_with is not None and (
            share_prompt_with.prompt_ids != prompt_ids or share_prompt_with.adapter != adapter
        ):
            raise RequestError(
                "share_prompt_with: expected a request of the same prompt and adapter, got "
                f"{share_prompt_with.request_id!r} (adapter {share_prompt_with.adapter!r})"
            )
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int(self._seed_rng.integers(2**63)))
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_ids=prompt_ids,
            sampling=sampling,
            adapter=adapter,
            stream_deltas=stream,
            priority=priority,
            tenant=tenant if tenant is not None else (adapter or ""),
        )
        request._grammar = grammar
        request._bad_words = bad_words
        if sampling.allowed_token_ids is not None:
            request._allowed_tokens = token_mask(sampling.allowed_token_ids, self.config.vocab_size)
        request.prompt_leader = share_prompt_with
        if self.tokenizer is not None:
            request._detok_state = self.tokenizer.incremental_decoder(
                prompt_ids, skip_special_tokens=sampling.skip_special_tokens
            )
        if sampling.stop_strings:
            request._stop_detector = StopStringDetector(
                sampling.stop_strings, include_stop=sampling.include_stop_str_in_output
            )
        if sampling.prompt_logprobs is not None:
            request.prompt_logprobs, request.prompt_top_logprobs = [None], [None]
            request.prompt_logprob_ranks = [None]
        if deadline_s is not None:
            request.deadline = request.arrival + deadline_s
        with self._lock:
            if len(self._waiting) >= self.engine_config.max_waiting:
                raise PoolExhaustedError(
                    f"engine queue is full ({len(self._waiting)} waiting requests); retry later"
                )
            if request.request_id in self._by_id:
                raise RequestError(f"request id {request.request_id!r} is already in use")
            tenant = request.tenant
            if tenant not in self._tenant_requests and self._tenant_requests:
                # Policy 9: back from idle, from the lowest counter of the busy tenants.
                lowest = min(self._service[t] for t in self._tenant_requests)
                self._service[tenant] = max(self._service[tenant], lowest)
            self._tenant_requests[tenant] += 1
            self._waiting.append(request)
            self._by_id[request.request_id] = request
            if request.deadline is not None:
                self._deadline_requests.add(request)
            self.stats.requests_per_adapter[adapter or ""] += 1
        self._wakeup.set()
        return request

    def token_masks(self, field: str = "structured_output") -> TokenMasks:
        """The structured outputs' tokenizer and matchers (built when first asked for: some
        hundreds of milliseconds for a large vocabulary)."""
        if self.tokenizer is None:
            raise RequestError(
                f"{field}: structured outputs match text, and this engine has no tokenizer"
            )
        with self._token_masks_lock:
            if self._token_masks is None:
                self._token_masks = TokenMasks(
                    self.tokenizer, self.config.vocab_size, sorted(self.eos_ids)
                )
        return self._token_masks

    def cancel(self, request_id: str) -> None:
        """Cancels a request (e.g. its client disconnected); its pages are freed next step."""
        with self._lock:
            request = self._by_id.get(request_id)
            if request is not None:
                request.cancel_requested = True
                self._cancelled.add(request)
        self._wakeup.set()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def queue_snapshot(self) -> QueueSnapshot:
        with self._lock:
            waiting = collections.Counter(r.adapter for r in self._waiting)
            running = collections.Counter(r.adapter for r in self._running)
            by_priority = collections.Counter(r.priority for r in self._waiting)
            service = dict(self._service)
        return QueueSnapshot(dict(waiting), dict(running), dict(by_priority), service)

    def run_until_idle(self, max_steps: int | None = None) -> None:
        steps = 0
        while self.has_work():
            self.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return

    def start(self) -> None:
        """Runs the engine loop in a background thread (the server's mode)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="jaxlora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._wakeup.wait(timeout=0.05)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # an engine bug must not kill the server: fail the batch, go on
                log.exception("engine step failed; failing the running requests")
                self._pending = []
                self._register = self.runner.empty_register
                with self._lock:
                    for request in list(self._running):
                        self._finish(request, FinishReason.ERROR, "internal error in the step")

    def warmup(self) -> dict:
        """Compiles every shape bucket (with and without LoRA) and its sampler variants, so that
        no request pays for a compilation; returns the shapes and seconds.

        The step shapes are lowered on this thread (tracing is Python) and compiled on
        ``compile_threads`` threads (XLA releases the GIL), then each bucket's sampler variants
        (lowered for the logits its step returns) on the same threads; running each bucket once
        afterwards finds every executable compiled."""
        start = time.perf_counter()
        kv = self.engine_config.kv
        variants = []  # (mode, rows, use_lora, padding-only batch, its LoRA metadata)
        for mode, rows, length, pages in self.runner.bucket_shapes(
            kv.max_pages_per_seq, kv.page_size
        ):
            batch = empty_batch(rows, length, pages)
            lora_meta = self._lora_meta([], batch.token_slot)
            variants.append((mode, rows, False, batch, lora_meta))
            if self.adapters is not None:
                variants.append((mode, rows, True, batch, lora_meta))
                # A step with few adapters, whose shrink runs inside lora_matmul.
                few = self._lora_meta([], batch.token_slot, mode=mode)
                if "shrink_rows" in few:
                    variants.append((mode, rows, True, batch, few))
                # A decode step of adapters with about one token each, run per token (at a
                # bucket with the in-loop shrink too: a step with many adapters' rank rows
                # has no shrink rows).
                if self._per_token_can_apply(mode, rows):
                    variants.append((mode, rows, True, batch, {**lora_meta, "per_token": True}))
        threads = min(self.engine_config.compile_threads, len(variants))
        if threads > 1:
            lowered = []
            for mode, _, use_lora, batch, lora_meta in variants:
                with self._locked_lora_pools() as lora_pools:
                    lowered.append(
                        self.runner.lower(
                            mode,
                            self.kv.k_pool,
                            self.kv.v_pool,
                            lora_pools,
                            batch,
                            lora_meta,
                            use_lora,
                        )
                    )
            lowered_at = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                compiled = list(pool.map(lambda item: item.compile(), lowered))
                samplers = self._lower_samplers(variants, compiled)
                list(pool.map(lambda item: item.compile(), samplers))
        else:
            lowered_at = start
        compiled_at = time.perf_counter()
        for mode, rows, use_lora, batch, lora_meta in variants:
            with self._locked_lora_pools() as lora_pools:
                logits, self.kv.k_pool, self.kv.v_pool = self.runner.run(
                    mode, self.kv.k_pool, self.kv.v_pool, lora_pools, batch, lora_meta, use_lora
                )
            if use_lora or self.adapters is None:  # once per bucket
                self._warm_sampler(logits, mode, rows)
        jax.block_until_ready(self.kv.k_pool)
        done = time.perf_counter()
        log.info(
            "warm-up: %d step shapes (prefill page tables of %s keys) lowered in %.1f s, "
            "compiled on %d threads in %.1f s, run with their samplers in %.1f s",
            len(variants),
            ", ".join(
                str(w * kv.page_size)
                for w in self.engine_config.runner.prefill_table_widths(
                    kv.max_pages_per_seq, kv.page_size
                )
            ),
            lowered_at - start,
            max(threads, 1),
            compiled_at - lowered_at,
            done - compiled_at,
        )
        return {
            "shapes": [  # (mode, rows, page-table width, LoRA, shrink in the kernel, per token)
                [
                    mode,
                    rows,
                    batch.page_table.shape[1],
                    use_lora,
                    "shrink_rows" in meta,
                    "per_token" in meta,
                ]
                for mode, rows, use_lora, batch, meta in variants
            ],
            "lower_s": lowered_at - start,
            "compile_s": compiled_at - lowered_at,
            "warmup_s": done - compiled_at,
        }

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> None:
        """One iteration (see the module docstring). Iterations from several threads (two
        ``LLM.generate`` calls without the engine thread, each stepping) take turns: two at once
        each completed or dropped the other's launched steps, whose requests then waited for
        their tokens for ever."""
        with self._step_lock:
            self._step()

    def _account(self, phase: str, wall_start: float, cpu_start: float) -> tuple[float, float]:
        """Adds the wall and thread-CPU seconds since (wall_start, cpu_start) to phase; returns
        the clocks' readings now."""
        wall, cpu = time.perf_counter(), time.thread_time()
        self.stats.host_seconds[phase] += wall - wall_start
        self.stats.host_cpu_seconds[phase] += cpu - cpu_start
        return wall, cpu

    def _step(self) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        if self.adapters is not None:
            self.adapters.poll()
        with self._lock:
            self._reap()
            self._admit()
            decode, prefill = self._schedule()
        self._account("schedule", start, cpu_start)
        # Every step of this iteration reads the tokens the previous iteration sampled from the
        # register as it was; the samplers chain their writes into the next one.
        register_in, launched = self._register, []
        # (the previous iteration's steps, also where async scheduling was switched off since)
        completing = self._pending
        # A structured output's mask needs the row's previous token (policy 6): then the
        # samplers wait until the model steps are dispatched and those tokens are read.
        defer_samplers = bool(completing) and any(
            request.masks_after_previous_token for request, _ in (*prefill, *decode)
        )
        for mode, rows in (("prefill", prefill), ("decode", decode)):
            launch = self._launch(mode, rows, register_in) if rows else None
            if launch is not None:
                if not defer_samplers:
                    self._dispatch_sampler(launch)
                launched.append(launch)
        if defer_samplers:
            for launch in completing:
                self._complete(launch)
            completing = self._pending = []
            for launch in launched:
                self._dispatch_sampler(launch)
        self.stats.prefill_steps += sum(launch.mode == "prefill" for launch in launched)
        self.stats.decode_steps += sum(launch.mode == "decode" for launch in launched)
        if self.async_scheduling:
            # The device now has this iteration's steps queued: reading the previous one's
            # tokens (and the host work on them) overlaps with them.
            self._pending = launched
        else:
            self._pending = []
            completing = [*completing, *launched]
        for launch in completing:
            self._complete(launch)
        if launched:
            self.stats.steps += 1
            elapsed = time.perf_counter() - start
            ema = self.stats.step_time_ema
            self.stats.step_time_ema = elapsed if ema == 0 else 0.9 * ema + 0.1 * elapsed
        elif not completing and self.has_work():
            time.sleep(0.001)  # every runnable request waits on an adapter copy

    def _reap(self) -> None:
        now = time.monotonic()
        if self._cancelled:
            for request in list(self._running) + list(self._waiting):
                if request.cancel_requested:
                    self._finish(request, FinishReason.ABORT, "cancelled")
            self._cancelled = {r for r in self._cancelled if not r.finished}
        self._deadline_requests = {r for r in self._deadline_requests if not r.finished}
        if not any(map(self._awaits_first_token_by_deadline, self._deadline_requests)):
            return
        ec = self.engine_config
        ema = self.stats.step_time_ema
        # Prompt tokens still to prefill ahead of each request: running ones first (their chunks
        # come first), then the queue in order. Each iteration prefills at most max_num_tokens.
        ahead = 0
        for request in list(self._running) + self._queue_order():
            own = max(0, len(request.prompt_ids) - request.num_computed)
            if self._awaits_first_token_by_deadline(request):
                # Admitted or not, a request without its first token (its adapter still
                # loading, its prompt half prefilled) is aborted once it cannot make it: its own
                # chunks, and the iterations the prompts ahead of it need.
                steps = -(-own // ec.runner.prefill_chunk) + ahead // max(1, ec.max_num_tokens)
                if now > request.deadline or now + steps * ema > request.deadline:
                    self.stats.deadline_aborts += 1
                    self._finish(
                        request,
                        FinishReason.DEADLINE,
                        "the request could no longer meet its first-token deadline",
                    )
                    continue
            ahead += own

    @staticmethod
    def _awaits_first_token_by_deadline(request: Request) -> bool:
        """A request with a first-token deadline and no first token yet (none in flight)."""
        return request.deadline is not None and not request.output_ids and not request.inflight

    @staticmethod
    def _adapter_key(request: Request) -> tuple[str, int]:
        """The adapter version a request runs with: requests on the old and the new version
        of a replaced adapter use different slots (different pages) in the same step."""
        handle = request.adapter_handle
        return (handle.name, handle.version)

    def _kv_key(self, request: Request):
        """What a request's K/V depend on besides its tokens: its adapter version (None: the
        base model's)."""
        return None if request.adapter is None else self._adapter_key(request)

    def _distinct_adapters(self) -> set[tuple[str, int]]:
        return {
            self._adapter_key(r)
            for r in self._running
            if r.adapter is not None and r.adapter_handle is not None
        }

    def _queue_order(self) -> list[Request]:
        """The waiting requests in the order they are admitted: the queue's, by priority first
        under the "priority" policy (a stable sort: arrival order within a priority, and a
        preempted request at the front of its own), by tenants' service under "fair"."""
        policy = self.engine_config.scheduling_policy
        if policy == "priority":
            return sorted(self._waiting, key=lambda r: r.priority)
        if policy == "fair":
            return self._fair_order()
        return list(self._waiting)

    def _fair_order(self) -> list[Request]:
        """Policy 9's admission order: repeatedly the oldest waiting request of the tenant
        with the lowest counter, its prompt counted at once (as its admission will)."""
        queues: dict[str, collections.deque] = {}
        for request in self._waiting:
            queues.setdefault(request.tenant, collections.deque()).append(request)
        # (a heap of tenants: thousands of them wait in a busy server's queue)
        heap = [(self._service[t], q[0].arrival, t) for t, q in queues.items()]
        heapq.heapify(heap)
        order = []
        while heap:
            counter, _, tenant = heapq.heappop(heap)
            request = queues[tenant].popleft()
            if not request.fair_charged:
                counter += self._prompt_service(request)
            order.append(request)
            if queues[tenant]:
                heapq.heappush(heap, (counter, queues[tenant][0].arrival, tenant))
        return order

    def _fair_cost(self, tenant: str, tokens: float) -> float:
        """What ``tokens`` of weighted service add to a tenant's counter (policy 9)."""
        return tokens / self._fair_weight.get(tenant, 1.0)

    def _prompt_service(self, request: Request) -> float:
        """What a request's prompt adds to its tenant's counter when it is first admitted
        (policy 9; ``_fair_order`` counts it ahead of the admission)."""
        return self._fair_cost(request.tenant, FAIR_PROMPT_WEIGHT * len(request.prompt_ids))

    def _lowest_below(self, request: Request) -> Request | None:
        """The running request a higher-priority one may preempt (policy 8): the one of the
        lowest priority, newest among equals, of a strictly lower priority than request's."""
        if self.engine_config.scheduling_policy != "priority":
            return None
        lower = [
            r for r in self._running if r.status is Status.RUNNING and r.priority > request.priority
        ]
        return max(lower, key=lambda r: r.rank) if lower else None

    def _room_below(self, request: Request, pages: int) -> list[Request] | None:
        """What admitting a waiting request takes: [] where a batch row and ``pages`` more KV
        pages are free; else (policy 8) the fewest running requests of a lower priority than
        its, lowest first, whose preemption frees them; None where even all of those would not
        (nobody is preempted for a request that still could not be admitted)."""
        rows = len(self._running) + 1 - self.engine_config.runner.max_batch
        if rows <= 0 and pages <= self.kv.free_pages:
            return []
        if self.engine_config.scheduling_policy != "priority":
            return None
        lower = [
            r for r in self._running if r.status is Status.RUNNING and r.priority > request.priority
        ]
        return self._victims(
            request, sorted(lower, key=lambda r: r.rank, reverse=True), rows, pages
        )

    def _victims(
        self, request: Request, candidates: list[Request], rows: int, pages: int
    ) -> list[Request] | None:
        """The fewest of ``candidates`` (running requests), taken in their order, whose
        preemption gives ``request`` ``rows`` batch rows and leaves ``pages`` KV pages free;
        None where preempting them all would not. A page is freed once every sequence that
        holds it is preempted (prompt sharing, prefix caching); the request's own stay."""
        pages -= self.kv.free_pages
        if rows <= 0 and pages <= 0:
            return []
        if len(candidates) < rows:
            return None
        ids = {id(r) for r in candidates}
        kept = set(self.kv.pages_of(request.request_id))
        holders = collections.Counter()
        for r in self._running:
            if id(r) in ids:
                holders.update(set(self.kv.pages_of(r.request_id)))
            elif r is not request:
                kept.update(self.kv.pages_of(r.request_id))
        victims, freed = [], 0
        for victim in candidates:
            if len(victims) >= rows and freed >= pages:
                break
            victims.append(victim)
            for page in set(self.kv.pages_of(victim.request_id)):
                holders[page] -= 1
                if page is not None and not holders[page] and page not in kept:
                    freed += 1
        return victims if len(victims) >= rows and freed >= pages else None

    def _admit(self) -> None:
        ec = self.engine_config
        blocked: list[Request] = []  # passed over in this pass, in queue order
        # Past the fairness bound, where the request at it waits for its adapter's pages, the
        # waiting requests that hold their adapter (refused for KV pages after acquiring it, or
        # preempted) still go: they may hold the very pages it waits for, and running is how
        # they give them back.
        holders_only = False
        for request in self._queue_order():
            if request.status is not Status.WAITING:
                continue  # (a victim preempted in this pass: it waits for the next)
            if holders_only and request.adapter_handle is None:
                continue
            if self._awaits_leader(request):
                continue  # holds its place, blocks nobody: its leader's prefill is under way
            if len(self._running) >= ec.runner.max_batch and (
                # Policy 8: a row from a lower priority (_try_admit takes it), for a request
                # whose adapter lets it in.
                self._lowest_below(request) is None or not self._adapter_admissible(request)
            ):
                break
            outcome = self._try_admit(request)
            if outcome == _ADMITTED:
                # Every request passed over has been overtaken once more; once one of them has
                # been overtaken max_skips times, nothing behind it is admitted before it.
                for waiting in blocked:
                    waiting.skipped += 1
                bound = [waiting for waiting in blocked if waiting.skipped >= ec.max_skips]
                if bound:
                    if not self._waits_for_adapter_pages(bound[0]):
                        break
                    holders_only = True
                continue
            if request.status is Status.FINISHED:
                continue  # refused for good (unknown adapter, ...): blocks nobody
            if request.skipped >= ec.max_skips and not holders_only:
                # The fairness bound: nobody overtakes it any more.
                if not self._waits_for_adapter_pages(request):
                    break
                holders_only = True
            blocked.append(request)

    def _waits_for_adapter_pages(self, request: Request) -> bool:
        """Whether a waiting request was refused because its adapter is not resident (it
        holds no handle on it: the pool lacked the pages, or the step lacked a slot)."""
        return request.adapter is not None and request.adapter_handle is None

    def _adapter_admissible(self, request: Request) -> bool:
        """Whether the request's adapter (none, or held with a step slot for it) lets it in;
        acquires the adapter (its copy to the device starts) when a slot allows."""
        if request.adapter is None:
            return True
        # Every admission (a re-admission after preemption too) respects the step's slots.
        running = self._distinct_adapters()
        full = len(running) >= self.engine_config.lora_pool.max_slots
        if request.adapter_handle is None:
            current = self.adapters.store.current(request.adapter)
            if full and current is not None and current.key not in running:
                return False
            try:
                request.adapter_handle = self.adapters.acquire(request.adapter)
            except PoolExhaustedError:
                return False
            except JaxloraError as e:  # unknown, or its files broke since registration
                self._finish(
                    request,
                    FinishReason.ERROR,
                    f"adapter {request.adapter!r} could not be loaded: {e}",
                )
                return False
        # Replaced between the check and the acquire, or re-admitted after preemption while
        # other adapters took the slots: wait for a slot (keep the version held).
        return not (full and self._adapter_key(request) not in running)

    def _try_admit(self, request: Request) -> str:
        """Admits the request if it can, preempting running requests of a lower priority
        where that gets it a batch row and KV pages (policy 8, ``_room_below``); returns
        ``_ADMITTED``, ``_NO_PAGES`` (a row or KV pages are what it lacks) or ``_REFUSED``
        (its adapter's slot or pages; or it finished, refused for good)."""
        ec = self.engine_config
        if not self._adapter_admissible(request):
            return _REFUSED
        shared = self._leader_pages_tokens(request)
        # (an adapter replaced since the leader took its version: other K/V, nothing shared)
        if shared and self._kv_key(request.prompt_leader) == self._kv_key(request):
            shared = self.kv.share_prefix(
                request.prompt_leader.request_id,
                request.request_id,
                shared,
                window=self.config.attention_window,
            )
            request.num_computed = shared
        else:
            shared = 0
        cached = 0
        if (
            self.kv.prefix_caching
            and request.num_computed == 0
            and request.sampling.prompt_logprobs is None
        ):
            # Prefix caching: pages of a common prefix another sequence computed (at least one
            # token is left to compute, for the logits).
            cached = self.kv.attach_prefix(
                request.request_id,
                request.tokens,
                self._kv_key(request),
                request.scheduled_len - 1,
            )
            request.num_computed = cached
        first = min(request.remaining, ec.runner.prefill_chunk)
        self._release_before_window(request)
        need = self.kv.extra_pages_needed(request.request_id, request.num_computed + first)
        victims = self._room_below(request, need)
        for victim in victims or ():
            self._preempt(victim)
        if victims is None or not self.kv.ensure(request.request_id, request.num_computed + first):
            self.kv.free(request.request_id)  # the cached pages it took, if any
            request.num_computed = 0
            return _NO_PAGES
        self.stats.prefix_cached_tokens += cached
        self.stats.shared_prompt_tokens += shared
        request.prompt_leader = None  # (shared or not: a recompute after preemption is its own)
        self._waiting.remove(request)
        request.status = Status.RUNNING
        if request.admitted_time is None:
            request.admitted_time = time.monotonic()
            request.num_cached_tokens = cached + shared
        self._running.append(request)
        if not request.fair_charged:  # (policy 9: a prompt counts once, recomputed or not)
            request.fair_charged = True
            self._service[request.tenant] += self._prompt_service(request)
        return _ADMITTED

    def _leader_pages_tokens(self, request: Request) -> int:
        """The prompt tokens a request would take from its running leader's full pages (one
        token left to compute for the logits); 0 when it has no running leader, has computed
        tokens, or asks for prompt logprobs (it computes its whole prompt)."""
        leader = request.prompt_leader
        if (
            leader is None
            or leader.status is not Status.RUNNING
            or request.num_computed
            or request.sampling.prompt_logprobs is not None
        ):
            return 0
        size = self.engine_config.kv.page_size
        return (len(request.prompt_ids) - 1) // size * size

    def _awaits_leader(self, request: Request) -> bool:
        """Whether a waiting request's running leader has not yet dispatched the prompt
        pages it will share."""
        wanted = self._leader_pages_tokens(request)
        return wanted > 0 and request.prompt_leader.num_computed < wanted

    def _schedule(self) -> tuple[list[tuple[Request, int]], list[tuple[Request, int]]]:
        """Rows of this iteration: (request, tokens to feed)."""
        ec = self.engine_config
        budget = ec.max_num_tokens
        decode, prefill = [], []
        for request in list(self._running):
            if request.status is not Status.RUNNING or not self._adapter_ready(request):
                continue
            if (
                request.remaining == 1
                and len(decode) < ec.runner.max_batch
                and budget > 0
                and not self._ends_when_read(request)
            ):
                if self._reserve(request, 1, (decode, prefill)):
                    decode.append((request, 1))
                    budget -= 1
        for request in list(self._running):
            if request.status is not Status.RUNNING or not self._adapter_ready(request):
                continue
            if request.remaining > 1 and len(prefill) < ec.runner.max_prefill_rows and budget > 0:
                n = min(request.remaining, ec.runner.prefill_chunk, budget)
                if self._reserve(request, n, (decode, prefill)):
                    prefill.append((request, n))
                    budget -= n
        return decode, prefill

    def _ends_when_read(self, request: Request) -> bool:
        """Whether the tokens being sampled for the request reach its max_tokens or the context
        length (async scheduling): then it must not be fed again."""
        return bool(request.inflight) and (
            len(request.output_ids) + request.inflight >= request.sampling.max_tokens
            or request.scheduled_len >= self.engine_config.kv.max_model_len
        )

    def _reserve(
        self, request: Request, n: int, scheduled: tuple[list[tuple[Request, int]], ...] = ()
    ) -> bool:
        """KV pages for n more tokens; preempts the newest running requests if needed, or
        else the requester itself: when it is the newest, or when preempting every newer one
        would not free enough (an older request is never preempted for a newer one, nor a
        newer one for nothing; under priorities, the last by ``Request.rank``, policy 8).
        Requests already scheduled this iteration are preempted only when nothing else is left
        (their work would be wasted)."""
        ranked = self.engine_config.scheduling_policy == "priority"
        order = (lambda r: r.rank) if ranked else (lambda r: r.arrival)
        self._release_before_window(request)
        if self.kv.ensure(request.request_id, request.num_computed + n):
            return True
        need = self.kv.extra_pages_needed(request.request_id, request.num_computed + n)
        taken = {id(r) for rows in scheduled for r, _ in rows}
        after = sorted(
            (
                r
                for r in self._running
                if r is not request and r.status is Status.RUNNING and order(r) > order(request)
            ),
            key=lambda r: (id(r) not in taken, order(r)),
            reverse=True,
        )
        victims = self._victims(request, after, 0, need)
        for victim in victims or ():
            self._preempt(victim)
        if victims is None or not self.kv.ensure(request.request_id, request.num_computed + n):
            self._preempt(request)
            return False
        return True

    def _release_before_window(self, request: Request) -> None:
        """With a sliding window, releases the request's KV pages wholly before the first key
        its next step's first query reads (the pages of its earlier steps stay readable: steps
        run in dispatch order; ``jaxlora.engine.kv_cache``)."""
        window = self.config.attention_window
        if window is not None:
            self.kv.release_before(request.request_id, request.num_computed - window + 1)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed = 0
        request.inflight = 0
        request.epoch += 1
        request.status = Status.WAITING
        request.preemptions += 1
        self.stats.preemptions += 1
        self._running.remove(request)
        self._waiting.appendleft(request)
        log.info("preempted %s (recompute later)", request.request_id)

    def _adapter_ready(self, request: Request) -> bool:
        if request.adapter is None:
            return True
        handle = request.adapter_handle
        if handle.error is not None:
            self._finish(
                request,
                FinishReason.ERROR,
                f"adapter {request.adapter!r} failed to load: {handle.error}",
            )
            return False
        return handle.ready

    # -- running rows ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_lora_pools(self):
        """The adapter pools, held while a step is dispatched on them: another thread's poll(),
        wait() or pin() donates the pool buffers to its scatters, which would otherwise delete
        the arrays under a dispatch. (The step reads the pools and does not donate them: they
        are the manager's, updated by its own donated scatters.)"""
        if self.adapters is None:
            yield {}
            return
        with self.adapters.locked_pools() as pools:
            yield pools

    def _lora_meta(self, slot_infos, token_slot: np.ndarray, mode: str | None = None) -> dict:
        """The step's LoRA metadata (slot i = slot_infos[i]); with the step's ``mode``, also
        the shrink rows when ``lora_matmul`` runs its shrink (few adapters, decode)."""
        pool = self.engine_config.lora_pool
        meta = layout.build_slot_metadata(
            slot_infos,
            max_slots=pool.max_slots,
            max_rank=pool.max_rank,
            rows_per_page=pool.rows_per_page,
        )
        if mode is not None:
            rows = self.runner.shrink_rows(mode, token_slot.size, meta["ranks"], len(slot_infos))
            if rows is not None:
                meta["shrink_rows"] = rows
        if self.runner.impl != "reference":
            # The kernels' token order and tiles, built here once per step rather than inside
            # every (layer, module group) launch.
            meta["kernel_meta"] = build_sgmv_metadata(
                token_slot.reshape(-1), pool.max_slots, config=self.runner.sgmv_config
            )
            if (
                mode is not None
                and "shrink_rows" not in meta
                and self._per_token_can_apply(mode, token_slot.size)
                and choose_per_token(
                    token_slot.reshape(-1), meta["ranks"], config=self.runner.sgmv_config
                )
            ):
                meta["per_token"] = True  # static: the runner compiles the step for it
        return meta  # host arrays: the runner sends them with the batch in one transfer

    def _per_token_can_apply(self, mode: str, num_tokens: int) -> bool:
        """Whether a step may run the SGMV kernels per token (``choose_per_token`` then decides
        from its adapters): decode steps only, whose kernels would otherwise be the prefill
        tiles in some projection group. Prefill rows are runs of one adapter's prompt, and
        keeping them to the tiles bounds the compiled variants (warm-up compiles these)."""
        if mode != "decode" or self.adapters is None:
            return False
        config = self.runner.sgmv_config
        rank_cols = self.engine_config.lora_pool.max_pages_per_weight * (
            self.engine_config.lora_pool.rows_per_page
        )
        widest = max(len(modules) for modules in layout.MODULE_GROUPS.values())
        return config.per_token_max_rows is not None and (
            config.regime(num_tokens, "shrink", columns=widest * rank_cols) == "prefill"
            or config.regime(num_tokens) == "prefill"
        )

    def _launch(
        self, mode: str, rows: list[tuple[Request, int]], register_in: jax.Array
    ) -> _Launch | None:
        """Builds and dispatches one step and its sampler; the host reads the results later
        (``_complete``). A row whose input token is still being sampled on the device (async
        scheduling) reads it from ``register_in``."""
        build_start, build_cpu = time.perf_counter(), time.thread_time()
        # A row scheduled earlier in this iteration may have been preempted since.
        rows = [(r, n) for r, n in rows if r.status is Status.RUNNING]
        if not rows:
            return None
        ec = self.engine_config
        length = 1 if mode == "decode" else ec.runner.prefill_chunk
        b = bucket(len(rows), ec.runner.buckets(mode))
        table_pages = ec.kv.max_pages_per_seq
        if mode == "prefill":  # the narrowest table that holds the longest row's context
            table_pages = ec.runner.prefill_table_width(
                max(request.num_computed + n for request, n in rows), table_pages, ec.kv.page_size
            )
        tokens = np.zeros((b, length), np.int32)
        positions = np.zeros((b, length), np.int32)
        valid = np.zeros((b, length), bool)
        page_table = np.zeros((b, table_pages), np.int32)
        seq_lens = np.zeros(b, np.int32)
        logit_index = np.zeros(b, np.int32)
        token_slot = np.full((b, length), layout.NO_ADAPTER, np.int32)
        token_src = np.full(b, -1, np.int32)
        slots: dict[tuple[str, int], int] = {}
        slot_infos = []
        for i, (request, n) in enumerate(rows):
            start = request.num_computed
            known = request.sequence_len
            if start + n <= known:
                tokens[i, :n] = request.tokens(start, n)
            else:  # its one token is the one the previous iteration is sampling
                token_src[i] = request.inflight_src
            positions[i, :n] = np.arange(start, start + n)
            valid[i, :n] = True
            page_table[i] = self.kv.page_table_row(request.request_id)[:table_pages]
            seq_lens[i] = start + n
            logit_index[i] = n - 1
            if request.adapter is not None:
                key = self._adapter_key(request)
                if key not in slots:
                    slots[key] = len(slot_infos)
                    slot_infos.append(request.adapter_handle.slot_info)
                token_slot[i, :n] = slots[key]
        batch = StepBatch(
            tokens=tokens,
            positions=positions,
            token_valid=valid,
            page_table=page_table,
            seq_lens=seq_lens,
            logit_index=logit_index,
            token_slot=token_slot,
            token_src=token_src,
        )
        use_lora = bool(slot_infos)
        lora_meta = self._lora_meta(slot_infos, token_slot, mode=mode if use_lora else None)
        prompt_targets, prompt_rows = self._prompt_targets(rows, b, length)
        extra = {} if prompt_targets is None else {"prompt_targets": prompt_targets}
        built, built_cpu = self._account("build", build_start, build_cpu)
        with self._locked_lora_pools() as lora_pools:
            logits, self.kv.k_pool, self.kv.v_pool, *prompt_logprobs = self.runner.run(
                mode,
                self.kv.k_pool,
                self.kv.v_pool,
                lora_pools,
                batch,
                lora_meta,
                use_lora,
                register=register_in,
                **extra,
            )
        samples = [r.num_computed + n == r.scheduled_len for r, n in rows]
        params = [r.sampling for r, _ in rows]
        token_indices = [len(r.output_ids) + r.inflight for r, _ in rows]
        processing = None
        if any(p.processes_logits for p in params):
            processing = logit_processing(
                params,
                [self._history(r) for r, _ in rows],
                token_indices,
                eos_ids=sorted(self.eos_ids),
                batch_size=b,
            )
        offset = ec.runner.register_offset(mode)
        launch = _Launch(mode=mode, sampled=None, rows=[])
        launch.sampler_inputs = _SamplerInputs(
            logits=logits,
            params=params,
            token_indices=token_indices,
            processing=processing,
            batch_rows=b,
            pending_register=register_in if processing is not None else None,
        )
        self._account("dispatch", built, built_cpu)
        if prompt_logprobs:
            launch.prompt_logprobs, launch.prompt_rows = prompt_logprobs[0], prompt_rows
            launch.prompt_logprobs.copy_to_host_async()
        with self._lock:
            caching = self.kv.prefix_caching  # (off: no per-row work on this hot path)
            for i, (request, n) in enumerate(rows):
                request.num_computed += n
                if caching:
                    self.kv.register_full_pages(
                        request.request_id,
                        request.tokens,
                        self._kv_key(request),
                        min(request.num_computed, request.sequence_len),
                    )
                if mode == "prefill":
                    self.stats.prompt_tokens += n
                if samples[i]:
                    request.inflight += 1
                    request.inflight_src = offset + i
                    launch.rows.append((request, request.epoch, i))
        return launch

    def _token_masks_of(self, rows, batch_rows: int) -> np.ndarray:
        """The sampler's (batch_rows, words) bitmask: each structured output's grammar, within
        each request's allowed tokens, less its bad words after its output so far; other rows
        allow every token."""
        live = [
            (request, row)
            for request, epoch, row in rows
            # (a request that ended meanwhile: its token is dropped, any mask does)
            if request.epoch == epoch and request.status is Status.RUNNING
        ]
        gated = [(r._grammar.mask_source(), row) for r, row in live if r._grammar is not None]
        matched = [(m, row) for (m, _), row in gated if m is not None and m is not False]
        if matched:
            masks = self._token_masks.bitmask(matched, batch_rows)
        else:
            masks = np.full((batch_rows, mask_words(self.config.vocab_size)), -1, np.int32)
        for (matcher, extra), row in gated:
            # (a reasoning's opening tag, beside the grammar's first tokens or alone)
            if matcher is False:
                masks[row] = 0
            if extra is not None:
                masks[row, extra // 32] |= np.int32(np.uint32(1 << (extra % 32)).view(np.int32))
        for request, row in live:
            if request._allowed_tokens is not None:
                restricted = masks[row] & request._allowed_tokens
                if restricted.any():  # (else the grammar decides)
                    masks[row] = restricted
            if request._bad_words is not None:
                banned = request._bad_words.banned(request.output_ids)
                apply_bans(masks[row], banned, self.config.vocab_size)
        return masks

    def _dispatch_sampler(self, launch: _Launch) -> None:
        """Dispatches a launched step's sampler (after its model step: a structured output's
        mask is computed only now, once the host has read the row's previous token)."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        inputs, launch.sampler_inputs = launch.sampler_inputs, None
        params = inputs.params
        allowed = None
        if any(p.masks_tokens for p in params):
            allowed = self._token_masks_of(launch.rows, inputs.batch_rows)
        sampling = SamplingBatch.from_params(
            params,
            inputs.token_indices,
            batch_size=inputs.batch_rows,
            processing=inputs.processing,
            allowed=allowed,
        )
        # Alternatives: none, or the most any request may ask for (each request keeps its own
        # first n): two sampler shapes per bucket instead of one per distinct n.
        top_n = MAX_LOGPROBS if any(p.logprobs for p in params) else 0
        launch.sampled, self._register = self._sample(
            inputs.logits,
            launch.mode,
            sampling,
            top_n=top_n,
            filtered=uses_filters(params),
            pending_register=inputs.pending_register,
        )
        launch.sampled.copy_to_host_async()
        self._account("dispatch", start, cpu_start)

    @staticmethod
    def _prompt_targets(rows, batch_rows: int, length: int):
        """(B, S) int32: for the rows whose requests ask for prompt logprobs, the prompt token
        after each of the step's positions that is not the prompt's last, -1 elsewhere; and
        those rows as (request, row, first position, end position). (None, []) where no row
        asks, or where every asking row's positions were recorded before a preemption."""
        asking = [
            (i, request, n)
            for i, (request, n) in enumerate(rows)
            if request.sampling.prompt_logprobs is not None
            and request.num_computed + 1 < len(request.prompt_ids)
        ]
        if not asking:
            return None, []
        targets = np.full((batch_rows, length), -1, np.int32)
        prompt_rows = []
        for i, request, n in asking:
            start = request.num_computed
            # Position p's logprob is that of prompt token p + 1 (the first has none).
            stop = min(start + n, len(request.prompt_ids) - 1)
            if stop <= len(request.prompt_logprobs) - 1:
                continue  # recorded before a preemption: this is its recompute
            targets[i, : stop - start] = request.prompt_ids[start + 1 : stop + 1]
            prompt_rows.append((request, i, start, stop))
        if not prompt_rows:
            return None, []
        return targets, prompt_rows

    def _record_prompt_logprobs(self, launch: _Launch) -> None:
        """Appends each asking request's prompt logprobs in prompt order; positions it has
        already (computed again after a preemption) are skipped."""
        chosen, ranks, top_ids, top_logprobs = unpack_prompt_logprobs(launch.prompt_logprobs)
        for request, row, start, stop in launch.prompt_rows:
            if request.status is not Status.RUNNING:
                continue
            n = request.sampling.prompt_logprobs
            position = len(request.prompt_logprobs) - 1  # the next position to record
            while start <= position < stop:
                j = position - start
                request.prompt_logprobs.append(float(chosen[row, j]))
                request.prompt_logprob_ranks.append(int(ranks[row, j]))
                request.prompt_top_logprobs.append(
                    {
                        int(t): float(lp)
                        for t, lp in zip(top_ids[row, j, :n], top_logprobs[row, j, :n], strict=True)
                    }
                )
                position += 1

    def _complete(self, launch: _Launch) -> None:
        """Reads a dispatched step's sampled tokens (waits for them) and appends them."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        host = np.asarray(launch.sampled)
        read, read_cpu = self._account("wait", start, cpu_start)
        sampled = unpack_samples(host)
        with self._lock:
            if launch.prompt_logprobs is not None:
                self._record_prompt_logprobs(launch)
            for request, epoch, row in launch.rows:
                # Preempted since (its token is sampled again after the recompute) or finished
                # while this step ran (a stop found in the previous token): dropped.
                if request.epoch != epoch or request.status is not Status.RUNNING:
                    continue
                request.inflight -= 1
                self._append_token(request, sampled, row)
        self._account("append", read, read_cpu)

    def _sample(
        self,
        logits,
        mode: str,
        sampling: SamplingBatch,
        *,
        top_n: int,
        filtered: bool,
        pending_register=None,
    ):
        """Dispatches the sampler of a step (its inputs in one packed transfer); returns its
        packed results and the token register with this mode's part rewritten."""
        args, static = self._sampler_arguments(logits, mode, sampling, top_n, filtered)
        with jax.transfer_guard_host_to_device("allow"):  # (its one packed transfer: Runner.run)
            return sample_step(*args, pending_register, **static)

    def _sampler_arguments(
        self, logits, mode: str, sampling: SamplingBatch, top_n: int, filtered: bool
    ) -> tuple[tuple, dict]:
        """sample_step's arguments before pending_register, and its static ones."""
        packed = PackedInputs.pack(sampling)
        static = dict(
            treedef=packed.treedef,
            layout=packed.layout,
            register_offset=self.engine_config.runner.register_offset(mode),
            num_top_logprobs=top_n,
            apply_filters=filtered,
        )
        return (logits, self._register, packed.buffer), static  # (jit transfers it)

    def _lower_samplers(self, variants, compiled) -> list:
        """Every sampler variant ``_warm_sampler`` runs, lowered for the logits each bucket's
        compiled step returns, for warmup to compile on its threads: compiled one after the
        other when first run, they took longer than all the steps together (H100, llama-2-7b
        server: the warm-up's run 53.5 s after 20.9 s of compiling the steps on 8 threads;
        the CPU demo: 6.8 of its 6.8 s)."""
        lowered, seen = [], set()
        for (mode, rows, use_lora, _, _), step in zip(variants, compiled, strict=True):
            if not (use_lora or self.adapters is None) or (mode, rows) in seen:
                continue
            seen.add((mode, rows))
            info = step.out_info[0]
            logits = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=info.sharding)
            sampling = SamplingBatch.from_params([], [], batch_size=rows)
            for top_n, filtered in itertools.product((0, MAX_LOGPROBS), (False, True)):
                args, static = self._sampler_arguments(logits, mode, sampling, top_n, filtered)
                lowered.append(sample_step.lower(*args, None, **static))
        return lowered

    def _warm_sampler(self, logits, mode: str, rows: int) -> None:
        """Compiles every sampler variant of a bucket (logprobs off/on, filters off/on).
        Steps with logit processing (bias, penalties, min_tokens) compile theirs when first
        run: one variant a power-of-two entry width (``sampling.logit_processing``)."""
        sampling = SamplingBatch.from_params([], [], batch_size=rows)
        for top_n in (0, MAX_LOGPROBS):
            for filtered in (False, True):
                jax.block_until_ready(
                    self._sample(logits, mode, sampling, top_n=top_n, filtered=filtered)
                )

    @staticmethod
    def _history(request: Request) -> RowHistory:
        """What the host knows of a request's sequence for its logit processing; its output
        token still being sampled (async scheduling) sits in the token register."""
        if request._prompt_unique is None:
            request._prompt_unique = unique_tokens(request.prompt_ids)
        return RowHistory(
            prompt_unique=request._prompt_unique,
            output_ids=request.output_ids,
            pending=request.inflight_src if request.inflight else -1,
        )

    def _append_token(self, request: Request, sampled, row: int) -> None:
        if math.isnan(sampled.logprobs[row]):
            # The chosen token's logprob (the model's log-softmax, sent every step) is NaN only
            # where the row's logits hold NaN or inf: its activations overflowed, and its token
            # would be an argmax over NaN. An error, not noise passed off as an answer.
            model = "the base model" if request.adapter is None else f"adapter {request.adapter!r}"
            self._finish(
                request,
                FinishReason.ERROR,
                f"the model's logits at output token {len(request.output_ids)} are not finite "
                f"(NaN or inf): the activations of {model} overflowed on this prompt",
            )
            return
        token = int(sampled.tokens[row])
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            self.stats.ttft.append(now - request.arrival)
            del self.stats.ttft[:-1000]
        request.output_ids.append(token)
        logprob = None
        top = None
        if request.sampling.logprobs is not None:
            logprob = float(sampled.logprobs[row])
            request.output_logprobs.append(logprob)
            if request.sampling.logprobs:
                n = request.sampling.logprobs
                top = {
                    int(t): float(lp)
                    for t, lp in zip(
                        sampled.top_token_ids[row][:n], sampled.top_logprobs[row][:n], strict=True
                    )
                }
                request.output_top_logprobs.append(top)
        self.stats.generated_tokens += 1
        self.stats.tokens_per_adapter[request.adapter or ""] += 1
        self._service[request.tenant] += self._fair_cost(request.tenant, FAIR_OUTPUT_WEIGHT)
        sp = request.sampling
        finish, stop_reason = None, None
        # min_tokens: the sampler banned EOS and the stop tokens, and no stop string counts yet.
        may_stop = len(request.output_ids) > sp.min_tokens
        if may_stop and not sp.ignore_eos and token in self.eos_ids:
            finish = FinishReason.STOP
        elif may_stop and token in sp.stop_token_ids:
            finish, stop_reason = FinishReason.STOP, token
        grammar, grammar_done = request._grammar, False
        if grammar is not None:
            if not grammar.advance(token):
                # The mask allowed it: the matcher gave up on the grammar the request sent (a
                # limit of llguidance's lexer or parser, met only once the output reached it,
                # e.g. "(a{1000}){1000}"'s "too many expressions"): the request's fault.
                field = sp.structured_output.field
                self._finish(
                    request,
                    FinishReason.ERROR,
                    f"{field}: the structured output's grammar failed at output token "
                    f"{len(request.output_ids) - 1} ({grammar.get_error().splitlines()[0]})",
                    error_is_request=True,
                )
                return
            grammar_done = grammar.is_stopped()  # the grammar can take nothing more
        # A stop token's text (EOS, stop_token_ids) is not the output's, as in vLLM, unless
        # include_stop_str_in_output.
        if finish is FinishReason.STOP and not sp.include_stop_str_in_output:
            text = ""
        else:
            text = self._detokenize(request, token)
        detector = request._stop_detector
        if detector is not None and finish is None:
            text, stopped = detector.push(text, detect=may_stop)
            if stopped:
                finish, stop_reason = FinishReason.STOP, detector.matched
        if finish is None and grammar_done:
            finish = FinishReason.STOP
        if finish is None and (
            len(request.output_ids) >= sp.max_tokens
            or request.sequence_len >= self.engine_config.kv.max_model_len
        ):
            finish = FinishReason.LENGTH
        if finish is not None and not (detector is not None and detector.stopped):
            # The end of the output: what the decoder and the stop detector held back is text.
            if request._detok_state is not None:
                tail = request._detok_state.finish()
                text += detector.push(tail)[0] if detector is not None else tail
            if detector is not None:
                text += detector.flush()
        request.text += text
        request.stop_reason = stop_reason
        first = len(request.output_ids) == 1
        request.push(
            Delta(
                token_ids=[token],
                text=text,
                logprobs=[logprob] if logprob is not None else None,
                top_logprobs=[top] if top is not None else None,
                # With the first token, whose step's prompt logprobs were recorded before it.
                prompt_logprobs=request.prompt_logprobs if first else None,
                prompt_top_logprobs=request.prompt_top_logprobs if first else None,
                last=finish is not None,
            )
        )
        if finish is not None:
            self._finish(request, finish)

    def _detokenize(self, request: Request, token: int) -> str:
        if request._detok_state is None:
            return ""
        return request._detok_state.push(token)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        error: str | None = None,
        *,
        error_is_request: bool = False,
    ) -> None:
        if request.status is Status.FINISHED:
            return
        if request in self._running:
            self._running.remove(request)
        if request in self._waiting:
            self._waiting.remove(request)
        self.kv.free(request.request_id)
        if request.adapter_handle is not None:
            self.adapters.release(request.adapter_handle)
            request.adapter_handle = None
        tenant = request.tenant
        self._tenant_requests[tenant] -= 1
        if not self._tenant_requests[tenant]:
            del self._tenant_requests[tenant]  # (only busy tenants stay: policy 9's lift)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.error = error
        request.error_is_request = error_is_request
        request.finish_time = time.monotonic()
        self._by_id.pop(request.request_id, None)
        self.stats.finished += 1
        if request.first_token_time is not None and len(request.output_ids) > 1:
            self.stats.tpot.append(
                (request.finish_time - request.first_token_time) / (len(request.output_ids) - 1)
            )
            del self.stats.tpot[:-1000]
        request.push(Delta(token_ids=[], text="", finish_reason=reason, error=error))

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prompt prefix (``KVCacheManager.reset_prefix_cache``): later
        requests compute their prompts again, running ones keep their pages. The number of
        pages that were registered (0 without prefix caching)."""
        with self._lock:
            dropped = self.kv.reset_prefix_cache()
        log.info("prefix cache reset: %d pages forgotten", dropped)
        return dropped

    def set_prefix_caching(self, enabled: bool) -> int:
        """Turns prefix caching on or off from now on (``KVCacheConfig.prefix_caching`` chooses
        it at start-up; a benchmark serves one trace each way on one compiled engine). The cache
        starts empty either way: the pages it held are forgotten (their number is returned);
        running requests keep theirs."""
        if not isinstance(enabled, bool):
            raise ConfigError(f"set_prefix_caching: expected a bool, got {enabled!r}")
        with self._lock:
            dropped = self.kv.reset_prefix_cache()
            self.kv.prefix_caching = enabled
        log.info(
            "prefix caching %s (%d cached pages forgotten)", "on" if enabled else "off", dropped
        )
        return dropped

    # -- introspection --------------------------------------------------------------------------
    def pool_usage(self) -> dict:
        usage = {
            "kv_free_pages": self.kv.free_pages,
            "kv_total_pages": self.engine_config.kv.num_pages,
            "kv_cached_pages": self.kv.cached_pages,
            "prefix_cached_tokens": self.stats.prefix_cached_tokens,
            "shared_prompt_tokens": self.stats.shared_prompt_tokens,
        }
        return usage


__all__ = ["Engine", "EngineConfig", "JaxloraError"]

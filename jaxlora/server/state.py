"""What the HTTP layer serves from: the LLM (engine + adapters), readiness, runtime adapter
loading inside the allowed roots, and the metrics."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import threading
import time

import jax

from jaxlora.engine import Request
from jaxlora.errors import (
    AdapterError,
    FormatError,
    JaxloraError,
    RequestError,
    UnknownAdapterError,
)
from jaxlora.llm import LLM
from jaxlora.memory.store import MEMORY_SOURCE
from jaxlora.sampling import SamplingParams
from jaxlora.server import metrics as prom
from jaxlora.server.config import ServerConfig
from jaxlora.server.device_memory import describe_device_memory, memory_report
from jaxlora.server.errors import RateLimitError, with_param
from jaxlora.server.generation import DeltaPump
from jaxlora.server.keys import ApiKey, KeysFile, TokenBucket, with_server_key
from jaxlora.server.responses import ResponseStore

log = logging.getLogger("jaxlora.server")

# /metrics' model (and fair-share tenant) of every per-request merge, ``merged-<digest>``.
REQUEST_MERGE_LABEL = "merged-*"
_REQUEST_MERGE_NAME = re.compile(r"merged-[0-9a-f]{16}")


def is_request_merge(adapter: str | None) -> bool:
    """Whether an adapter name is one ServingState.request_merge gives."""
    return adapter is not None and _REQUEST_MERGE_NAME.fullmatch(adapter) is not None


def reserved_name_message(name: str) -> str | None:
    """Why name cannot be an adapter's that a client or operator loads (None: it can). The
    per-request merges' names are the digest of their parts: an adapter loaded under one
    would be served as that merge to whoever later asks for it (and counted as a merge on
    /metrics)."""
    if not is_request_merge(name):
        return None
    return (
        f"adapter name {name!r} is reserved: merged-<16 hex digits> names LoRAX's per-request "
        "merges (parameters.merged_adapters); choose another name"
    )


def _encodable(path: str) -> bool:
    """Whether path can name a file (not, e.g., with a lone surrogate "\\ud800" from JSON)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def resolve_adapter_path(path: str, roots: tuple[str, ...]) -> str:
    """The real path of an adapter directory that lies inside one of roots.

    A relative path is taken relative to each root in turn. Symlinks are resolved before the
    check, so neither ``..`` nor a link can lead outside the roots. Raises AdapterError.
    """
    if not roots:
        raise with_param(
            AdapterError(
                "runtime adapter loading is disabled: the server was started without allowed "
                "adapter roots (scripts/serve.py --allowed_adapter_roots=DIR[,DIR...])"
            ),
            "lora_path",
        )
    if not isinstance(path, str) or not path or "\x00" in path or not _encodable(path):
        raise with_param(
            AdapterError(f"lora_path {path!r}: expected a directory path"), "lora_path"
        )
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    inside = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if any(
            real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in real_roots
        ):
            inside.append(real)
    if not inside:
        raise with_param(
            AdapterError(
                f"lora_path {path!r}: not inside an allowed adapter root (symlinks resolved); "
                "only directories under --allowed_adapter_roots can be loaded at runtime"
            ),
            "lora_path",
        )
    existing = [p for p in inside if os.path.isdir(p)]
    return existing[0] if existing else inside[0]


class ServingState:
    """One served model: the LLM, its public name, and what the endpoints need around it."""

    def __init__(self, llm: LLM, config: ServerConfig, *, keys_file: KeysFile | None = None):
        """keys_file: the tenants' keys, read again when the file changes (instead of
        config.api_keys)."""
        self.llm = llm
        self.keys_file = keys_file
        self.engine = llm.engine
        self.adapters = llm.adapters
        self.tokenizer = llm.tokenizer
        self.config = config
        self.max_model_len = llm.engine_config.kv.max_model_len
        # No token stands for more characters than the vocabulary's longest entry, so a text
        # longer than max_model_len such tokens cannot fit: refused before it is tokenized.
        self.longest_token_chars = (
            None
            if self.tokenizer is None
            else max(len(t) for t in self.tokenizer.backend.get_vocab(with_added_tokens=True))
        )
        self.metrics = prom.ServerMetrics(self.max_model_len)
        self.pump = DeltaPump(
            config.stream_poll_s, self._on_finish, stream_interval=config.stream_interval
        )
        # request id -> its API key's name, until it ends; each key's requests in flight (both
        # touched on the event loop only: by the handlers and the delta pump)
        self._callers: dict[str, str] = {}
        self._in_flight: collections.Counter = collections.Counter()
        self._buckets: dict[str, TokenBucket] = {}  # key name -> its tokens a minute
        self.clock = time.monotonic  # (the buckets' clock)
        self.created = int(time.time())
        self._adapter_created: dict[str, int] = {}
        self.responses = ResponseStore(config.max_stored_responses)
        self._on_demand_lock = threading.Lock()
        # LoRAX's per-request merges, least recently requested first (request_merge), and the
        # handlers between a merge and their requests' submission (release_merge)
        self._merge_lock = threading.RLock()  # (unload_adapter takes it under it)
        self._request_merges: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._merge_holds: collections.Counter[str] = collections.Counter()
        self._ready = threading.Event()
        self._started = False
        self._warmup_error: BaseException | None = None
        self._warmup_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self, *, warm_up: bool = False, background: bool = False, on_ready=None) -> None:
        """Starts the engine loop; with warm_up, first compiles every step shape. In the
        background, requests that arrive meanwhile queue in the engine and run once it is warm
        (GET /health answers 503 until then)."""
        if self._started:
            return
        self._started = True

        def run():
            try:
                if warm_up:
                    start = time.perf_counter()
                    self.engine.warmup()
                    memory = describe_device_memory(jax.local_devices())
                    log.info(
                        "engine warm in %.1f s%s",
                        time.perf_counter() - start,
                        f"; device memory: {memory}" if memory else "",
                    )
                self.llm.start()
            except BaseException as e:  # reported by /health; the server stays up to say so
                self._warmup_error = e
                log.exception("engine warm-up failed")
                return
            self._ready.set()
            if on_ready is not None:
                on_ready()

        if background:
            self._warmup_thread = threading.Thread(target=run, name="jaxlora-warmup", daemon=True)
            self._warmup_thread.start()
        else:
            run()

    def stop(self) -> None:
        if self._warmup_thread is not None:
            self._warmup_thread.join()
        self.llm.stop()
        self.adapters.close()
        self._ready.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def health(self) -> tuple[bool, str]:
        if self._warmup_error is not None:
            return False, f"engine failed to start: {self._warmup_error}"
        if not self._started or not self.ready:
            return False, "starting (compiling the engine's step shapes)"
        return True, "ok"

    # ------------------------------------------------------------------ models and adapters

    def knows_model(self, name: str) -> bool:
        """Whether ``resolve_model`` answers at once (no adapter to load from disk)."""
        return name == self.config.model_name or name in self.adapters.store

    def resolve_model(self, name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model). With
        ``load_adapters_on_demand``, an unknown name that is an adapter directory under the
        roots is registered first (call it off the event loop: it reads the adapter's headers
        from disk)."""
        if name == self.config.model_name:
            return None
        if name in self.adapters.store:
            return name
        if self.config.load_adapters_on_demand and self._load_on_demand(name):
            return name
        raise self.unknown_model(name)

    def unknown_model(self, name: str) -> UnknownAdapterError:
        """The 404 of a model that is not served (or that the caller's key may not use: the
        same answer, so that a key learns nothing of the models it cannot reach)."""
        return with_param(
            UnknownAdapterError(
                f"The model `{name}` does not exist: it is neither the base model nor a "
                "registered adapter (GET /v1/models lists them)"
            ),
            "model",
        )

    def _load_on_demand(self, name: str) -> bool:
        """Registers the adapter directory ``name`` (a relative path under the roots) if there
        is one; False if there is none. A directory that is there but does not load raises
        (400, naming `model`). Concurrent requests for the same new name load it once. Only a
        directory's own spelling loads: "a/../b", "./b" or "b/" would register b's weights
        again under another name each, and pass an API key's patterns for a (acme-*/../globex)."""
        if os.path.isabs(name) or not _encodable(name) or "\x00" in name:
            return False
        if any(part in ("", ".", "..") for part in name.split("/")):
            return False
        try:
            real = resolve_adapter_path(name, self.config.adapter_roots)
        except AdapterError:  # outside the roots (".." or a link): as if there were none
            return False
        if not os.path.isfile(os.path.join(real, "adapter_config.json")):
            return False
        with self._on_demand_lock:
            if name in self.adapters.store:  # a concurrent request loaded it
                return True
            try:
                self.load_adapter(name, name)
            except JaxloraError as e:
                self.metrics.on_demand_loads.inc("failed")
                raise with_param(
                    type(e)(f"model {name!r}: the adapter directory did not load: {e}"), "model"
                ) from None
        self.metrics.on_demand_loads.inc("loaded")
        log.info("adapter %r loaded on demand", name)
        return True

    def models(self) -> list[dict]:
        base = {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxlora",
            "root": self.config.model_name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        cards = [base]
        for name in self.adapters.store.names():
            entry = self.adapters.store.current(name)
            if entry is None:  # unregistered meanwhile
                continue
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self._adapter_created.get(name, self.created),
                    "owned_by": "jaxlora",
                    "root": entry.source if entry.source != MEMORY_SOURCE else name,
                    "parent": self.config.model_name,
                    "max_model_len": self.max_model_len,
                    "pinned": self.adapters.is_pinned(name),  # (jaxlora's: never evicted)
                }
            )
        return cards

    def load_adapter(self, name: str, path: str, *, replace: bool = False) -> str:
        """Registers the PEFT directory at path (inside the allowed roots) as name; returns the
        real path. Raises AdapterError / FormatError (400) with the reason."""
        self._check_new_name(name, replace)
        real = resolve_adapter_path(path, self.config.adapter_roots)
        if not os.path.isdir(real):
            raise with_param(
                FormatError(
                    f"lora_path {path!r}: no such adapter directory under the allowed adapter roots"
                ),
                "lora_path",
            )
        self._register(name, real, replace)
        log.info("adapter %r loaded from %s", name, real)
        return real

    def merge_adapters(
        self, name: str, parts: list[tuple[str, float]], *, replace: bool = False
    ) -> None:
        """Registers the weighted sum of loaded adapters' updates as name
        (``AdapterStore.merged_weights``). UnknownAdapterError (404) naming the part that is
        not loaded; AdapterError (400) for no parts or a rank past the pool's."""
        self._check_new_name(name, replace)
        store = self.adapters.store
        for i, (part, _) in enumerate(parts):
            if part not in store:
                raise with_param(
                    UnknownAdapterError(
                        f"merge[{i}].lora_name: the lora adapter '{part}' is not loaded"
                    ),
                    f"merge[{i}].lora_name",
                )
        try:
            weights = store.merged_weights(name, parts)
        except AdapterError as e:
            raise with_param(AdapterError(str(e)), "merge") from None
        self._register(name, weights, replace)
        log.info("adapter %r merged: %s", name, weights.source)

    def request_merge(
        self,
        parts: list[tuple[str, float]],
        *,
        strategy: str,
        density: float,
        majority_sign_method: str,
    ) -> str:
        """The adapter of LoRAX's per-request ``merged_adapters`` (registered adapters, with
        their weights): ``merged-<digest>``, the digest of the parts' current versions and the
        merge's fields, computed and registered the first time (``AdapterStore
        .parameter_merged_weights``; DARE's draws seeded by the digest, so one merge is one
        adapter). At most ``max_request_merges`` are kept: past them the least recently
        requested that no request waits for or runs on is unloaded (one in use stays, over
        the limit, until a later merge finds it unused). The caller holds the merge until its
        requests are submitted, and must then call ``release_merge(name)``, whatever happened.
        Call it off the event loop. RequestError where the server takes none; AdapterError
        (``parameters.merged_adapters``) for parts of different ranks."""
        field = "parameters.merged_adapters"  # (LoRAX's field: the one route that merges)
        limit = self.config.max_request_merges
        if not limit:
            raise with_param(
                RequestError(
                    f"{field}: per-request merges are off on this server "
                    "(--max_request_merges=0); merge once with POST /v1/load_lora_adapter's "
                    "merge and send that name"
                ),
                field,
            )
        store = self.adapters.store
        versions = [store.get(part).key for part, _ in parts]
        spec = json.dumps(
            [versions, [w for _, w in parts], strategy, density, majority_sign_method]
        )
        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
        name = f"merged-{digest}"
        with self._merge_lock:
            if name in store:
                self._merge_holds[name] += 1
                if name in self._request_merges:
                    self._request_merges.move_to_end(name, last=True)
                    self._unload_unused_merges(limit)  # (ones in use earlier may be free now)
                return name
            try:
                weights = store.parameter_merged_weights(
                    name,
                    parts,
                    strategy=strategy,
                    density=density,
                    majority_sign_method=majority_sign_method,
                    seed=int(digest, 16),
                )
                self._register(name, weights, replace=False)  # (NaN / inf weights refused)
            except AdapterError as e:
                raise with_param(AdapterError(f"{field}: {e}"), field) from None
            self._request_merges[name] = None
            self._request_merges.move_to_end(name, last=True)
            self._merge_holds[name] += 1
            log.info("adapter %r merged for a request: %s", name, weights.source)
            self._unload_unused_merges(limit)
        return name

    def release_merge(self, name: str) -> None:
        """Ends request_merge's hold on name (its requests are in the engine's queue now, or
        were never submitted)."""
        with self._merge_lock:
            self._merge_holds[name] -= 1
            if self._merge_holds[name] <= 0:
                del self._merge_holds[name]

    def _unload_unused_merges(self, limit: int) -> None:
        """Unloads the least recently requested merges past limit that are neither held nor
        waited for or run on by a request of the engine (under _merge_lock)."""
        excess = len(self._request_merges) - limit
        if excess <= 0:
            return
        snapshot = self.engine.queue_snapshot()
        in_use = set(self._merge_holds) | set(snapshot.waiting) | set(snapshot.running)
        for name in [n for n in self._request_merges if n not in in_use][:excess]:
            if name in self.adapters.store:
                self.unload_adapter(name)
            else:
                self._request_merges.pop(name, None)

    def _check_new_name(self, name: str, replace: bool) -> None:
        reserved = reserved_name_message(name)
        if reserved:
            raise with_param(AdapterError(f"lora_name: {reserved}"), "lora_name")
        if name == self.config.model_name:
            raise with_param(
                AdapterError(f"lora_name {name!r}: that is the base model's name"), "lora_name"
            )
        if replace and name not in self.adapters.store:
            raise with_param(
                UnknownAdapterError(
                    f"lora_name {name!r}: load_inplace replaces a loaded adapter, and none is "
                    "loaded under that name"
                ),
                "lora_name",
            )
        if not replace and name in self.adapters.store:
            raise with_param(
                AdapterError(
                    f"The lora adapter '{name}' has already been loaded (unload it first, or "
                    "pass load_inplace=true to replace it)"
                ),
                "lora_name",
            )

    def _register(self, name: str, source, replace: bool) -> None:
        register = self.adapters.replace if replace else self.adapters.register
        try:
            register(name, source)
        except AdapterError as e:
            if getattr(e, "param", None) is None and str(e).startswith("adapter name "):
                # The store's name check: say which field of the request it is about.
                raise with_param(AdapterError(f"lora_name: {e}"), "lora_name") from None
            raise
        self._adapter_created[name] = int(time.time())

    def unload_adapter(self, name: str) -> None:
        """Forgets name; requests already running finish with its weights (their pages are
        freed when they end), queued ones fail with 404."""
        try:
            self.adapters.unregister(name)
        except UnknownAdapterError as e:
            raise with_param(
                UnknownAdapterError(
                    f"The lora adapter '{name}' cannot be found (it is not loaded)"
                ),
                "lora_name",
            ) from e
        self._adapter_created.pop(name, None)
        self.engine.stats.requests_per_adapter.pop(name, None)
        with self._merge_lock:
            self._request_merges.pop(name, None)
        log.info("adapter %r unloaded", name)

    # ------------------------------------------------------------------ requests

    def check_limits(self, caller: ApiKey | None, tokens: int) -> None:
        """The errors ``submit`` would raise now for the caller's max_in_flight and tokens a
        minute, for a request of ``tokens`` (its prompt and max_tokens), consuming nothing:
        for work to refuse before doing it (a per-request merge)."""
        self._check_in_flight(caller)
        self.reserve_tokens(caller, tokens)
        if caller is not None and caller.max_tokens_per_minute is not None:
            self._buckets[caller.name].give_back(tokens)

    def refuse_what_never_fits(self, caller: ApiKey | None, costs: list[int]) -> None:
        """RequestError (400) for a request whose generations (``costs``: each one's prompt and
        max_tokens) its key's limits could never take at once: more than its max_in_flight, or
        more tokens than its minute. A 429 would be retried for ever."""
        if caller is None:
            return
        limits = (
            (
                caller.max_in_flight,
                len(costs),
                "n",
                f"the request asks for {len(costs)} generations (its prompts times n), more "
                f"than API key {caller.name!r} may have in flight at once "
                f"({caller.max_in_flight}, max_in_flight)",
            ),
            (
                caller.max_tokens_per_minute,
                sum(costs),
                "max_tokens",
                f"the request's generations (its prompts times n) come to {sum(costs)} tokens "
                f"of prompt and max_tokens, more than API key {caller.name!r} may use in a "
                f"minute ({caller.max_tokens_per_minute})",
            ),
        )
        for limit, amount, field, what in limits:
            if limit is not None and amount > limit:
                raise with_param(RequestError(f"{field}: {what}; ask for fewer"), field)

    def _check_in_flight(self, caller: ApiKey | None) -> None:
        if caller is not None and caller.max_in_flight is not None:
            if self._in_flight[caller.name] >= caller.max_in_flight:
                raise RateLimitError(
                    f"API key {caller.name!r} has {self._in_flight[caller.name]} generations "
                    "in flight, its most (max_in_flight); retry when one ends"
                )

    def reserve_tokens(self, caller: ApiKey | None, tokens: int) -> None:
        """Takes a generation's tokens (its prompt and max_tokens) from its key's
        tokens a minute; RateLimitError (with the wait) when they are not there, RequestError
        when the key could never afford them."""
        budget = None if caller is None else caller.max_tokens_per_minute
        if budget is None:
            return
        if tokens > budget:
            raise with_param(
                RequestError(
                    f"max_tokens: the request's prompt and max_tokens come to {tokens} tokens, "
                    f"more than API key {caller.name!r} may use in a minute ({budget}); ask for "
                    "fewer"
                ),
                "max_tokens",
            )
        bucket = self._buckets.get(caller.name)
        if bucket is None or bucket.capacity != budget:  # (new, or the keys file changed it)
            bucket = self._buckets[caller.name] = TokenBucket(budget, clock=self.clock)
        wait = bucket.take(tokens)
        if wait is not None:
            raise RateLimitError(
                f"API key {caller.name!r} has used its {budget} tokens a minute "
                f"(max_tokens_per_minute; this request needs {tokens}); retry in "
                f"{wait:.1f} s",
                retry_after=wait,
            )

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None,
        request_id: str,
        share_prompt_with: Request | None = None,
        priority: int = 0,
        caller: ApiKey | None = None,
    ) -> Request:
        """share_prompt_with: an earlier choice of the same prompt (its prompt pages are
        shared, not computed again); priority: vLLM's (lower first, under the "priority"
        scheduling policy); caller: the request's API key (its usage is counted by key, and
        its max_in_flight caps its generations at once: RateLimitError beyond)."""
        self._check_in_flight(caller)
        cost = len(prompt_ids) + sampling.max_tokens
        self.reserve_tokens(caller, cost)
        deadline = self.config.first_token_deadline_s
        by_key = caller is not None and self.config.fair_share_by == "key"
        # (fair shares by model count the per-request merges as one tenant: one counter)
        tenant = (
            caller.name if by_key else REQUEST_MERGE_LABEL if is_request_merge(adapter) else None
        )
        try:
            request = self.engine.submit(
                prompt_ids,
                sampling,
                adapter=adapter,
                request_id=request_id,
                deadline_s=deadline,
                share_prompt_with=share_prompt_with,
                priority=priority,
                tenant=tenant,
            )
        except BaseException:
            if caller is not None and caller.name in self._buckets:
                self._buckets[caller.name].give_back(cost)  # (refused: nothing was used)
            raise
        self.metrics.requests.inc(self.model_label(adapter))
        if caller is not None:
            self._callers[request_id] = caller.name
            self._in_flight[caller.name] += 1
        return request

    def refuse_text_that_cannot_fit(self, text: str, field: str, what: str) -> None:
        """Raises a RequestError about ``field`` (its ``what``: "characters", ...) when text has
        more characters than max_model_len of the longest tokens hold (after the tokenizer's
        normalizer, which may merge characters): too long for sure, found without spending time
        on tokenizing it (seconds for megabytes)."""
        if self.longest_token_chars is None:
            return
        limit = self.max_model_len * self.longest_token_chars
        if len(text) <= limit:
            return
        normalizer = self.tokenizer.backend.normalizer
        if normalizer is not None and len(normalizer.normalize_str(text)) <= limit:
            return
        raise with_param(
            RequestError(
                f"{field}: {len(text)} {what}; the context length is {self.max_model_len} "
                f"tokens of at most {self.longest_token_chars} characters"
            ),
            field,
        )

    def tenant_label(self, tenant: str) -> str:
        """A fair-share tenant as /metrics names it: the API key's name under
        ``fair_share_by="key"``, else the model's."""
        return tenant if self.config.fair_share_by == "key" else self.model_label(tenant or None)

    def api_keys(self) -> tuple[ApiKey, ...]:
        """The keys a request may send now (``ServerConfig.keys``, the tenants' as the keys
        file holds them now)."""
        if self.keys_file is None:
            return self.config.keys
        return with_server_key(self.keys_file.current(), self.config.api_key)

    def model_label(self, adapter: str | None) -> str:
        """A model as /metrics names it: every per-request merge under one name
        (REQUEST_MERGE_LABEL), whose digests a client chooses without bound."""
        if adapter is None:
            return self.config.model_name
        return REQUEST_MERGE_LABEL if is_request_merge(adapter) else adapter

    def _per_model_label(self, counts: dict[str | None, int]) -> dict[tuple[str], int]:
        """{(model label,): count}, summed over the adapters one label stands for (every
        per-request merge is REQUEST_MERGE_LABEL)."""
        summed: collections.Counter = collections.Counter()
        for adapter, n in counts.items():
            summed[(self.model_label(adapter),)] += n
        return dict(summed)

    def _on_finish(self, request: Request) -> None:
        m = self.metrics
        label = self.model_label(request.adapter)
        caller = self._callers.pop(request.request_id, None)
        m.finished.inc(label, str(request.finish_reason))
        if caller is not None:
            bucket = self._buckets.get(caller)
            if bucket is not None:  # (the max_tokens it did not use)
                unused = max(0, request.sampling.max_tokens - len(request.output_ids))
                if request.admitted_time is None:
                    # Cancelled or refused while waiting (e.g. the earlier choices of an n-choice
                    # request refused part-way): its prompt was never computed either.
                    unused += len(request.prompt_ids)
                bucket.give_back(unused)
            self._in_flight[caller] -= 1
            if not self._in_flight[caller]:
                del self._in_flight[caller]
            m.key_requests.inc(caller)
            m.key_tokens.inc(caller, "prompt", amount=len(request.prompt_ids))
            m.key_tokens.inc(caller, "generation", amount=len(request.output_ids))
        m.prompt_tokens.inc(label, amount=len(request.prompt_ids))
        m.generation_tokens.inc(label, amount=len(request.output_ids))
        if request.first_token_time is not None:
            m.ttft.observe(request.first_token_time - request.arrival)
            if len(request.output_ids) > 1 and request.finish_time is not None:
                m.tpot.observe(
                    (request.finish_time - request.first_token_time) / (len(request.output_ids) - 1)
                )
        if request.finish_time is not None:
            m.latency.observe(request.finish_time - request.arrival)
        m.request_prompt_tokens.observe(len(request.prompt_ids))
        m.request_generation_tokens.observe(len(request.output_ids))
        admitted = request.admitted_time
        if admitted is not None:
            m.queue_time.observe(admitted - request.arrival)
            if request.first_token_time is not None:
                m.prefill_time.observe(request.first_token_time - admitted)
                if request.finish_time is not None:
                    m.decode_time.observe(request.finish_time - request.first_token_time)
        if self.config.log_requests:
            ttft = request.first_token_time
            log.info(
                "request %s model=%s key=%s prompt_tokens=%d output_tokens=%d finish=%s "
                "ttft=%s e2e=%s preemptions=%d",
                request.request_id,
                label,
                caller or "-",
                len(request.prompt_ids),
                len(request.output_ids),
                request.finish_reason,
                "-" if ttft is None else f"{ttft - request.arrival:.3f}s",
                "-"
                if request.finish_time is None
                else f"{request.finish_time - request.arrival:.3f}s",
                request.preemptions,
            )

    # ------------------------------------------------------------------ /metrics

    def metrics_text(self) -> str:
        engine, stats = self.engine, self.engine.stats
        manager = self.adapters.stats()
        usage = self.engine.pool_usage()
        kv_total, kv_free = usage["kv_total_pages"], usage["kv_free_pages"]
        lines = self.metrics.own()
        lines += prom.gauge(
            "jaxlora_num_requests_waiting",
            "Requests queued in the engine, not yet admitted.",
            engine.num_waiting,
        )
        lines += prom.gauge(
            "jaxlora_num_requests_running",
            "Requests holding KV pages (prefilling or decoding).",
            engine.num_running,
        )
        queues = engine.queue_snapshot()
        lines += prom.gauge(
            "jaxlora_model_requests_waiting",
            "Requests queued in the engine, per model (adapters with none are not listed).",
            self._per_model_label(queues.waiting),
            ("model",),
        )
        lines += prom.gauge(
            "jaxlora_model_requests_running",
            "Requests holding KV pages, per model (adapters with none are not listed).",
            self._per_model_label(queues.running),
            ("model",),
        )
        policy = engine.engine_config.scheduling_policy
        if policy == "priority":
            lines += prom.gauge(
                "jaxlora_requests_waiting_by_priority",
                "Requests queued in the engine, per priority (lower is served first).",
                {(str(p),): n for p, n in queues.waiting_by_priority.items()},
                ("priority",),
            )
        if policy == "fair":
            lines += prom.gauge(
                "jaxlora_fair_share_service",
                "Service each tenant (a model, or an API key under --fair_share_by=key) has "
                "been counted under --scheduling_policy=fair (prompt tokens plus twice the "
                "output tokens, over its --fair_share_weights weight; lifted to the lowest busy "
                "one's on return from idle); the least served waiting tenant goes first.",
                {(self.tenant_label(t),): v for t, v in queues.fair_service.items()},
                ("tenant",),
            )
        lines += prom.gauge(
            "jaxlora_open_requests",
            "Requests the server is streaming or waiting on.",
            self.pump.open_requests,
        )
        lines += prom.gauge(
            "jaxlora_requests_cancelling",
            "Requests whose client went away, not yet ended by the engine.",
            self.pump.cancelling,
        )
        lines += prom.gauge("jaxlora_kv_cache_pages_total", "Pages of the KV cache pool.", kv_total)
        lines += prom.gauge(
            "jaxlora_kv_cache_pages_free", "Free pages of the KV cache pool.", kv_free
        )
        lines += prom.gauge(
            "jaxlora_kv_cache_pages_cached",
            "KV pages registered for prefix caching (held by requests or kept for later ones).",
            usage["kv_cached_pages"],
        )
        lines += prom.counter_snapshot(
            "jaxlora_prefix_cache_hit_tokens_total",
            "Tokens whose K/V came from the prefix cache instead of being computed (a "
            "prompt's, and a preempted request's prompt and output when it resumes).",
            usage["prefix_cached_tokens"],
        )
        lines += prom.counter_snapshot(
            "jaxlora_shared_prompt_tokens_total",
            "Prompt tokens of a request's later choices whose K/V the first choice computed.",
            usage["shared_prompt_tokens"],
        )
        lines += prom.gauge(
            "jaxlora_kv_cache_usage_ratio",
            "Used fraction of the KV cache pool.",
            (kv_total - kv_free) / kv_total if kv_total else 0.0,
        )
        pools = manager.pools
        lines += prom.gauge(
            "jaxlora_adapter_pool_pages_total",
            "Pages of each adapter page pool.",
            {(axis,): u.num_pages for axis, u in pools.items()},
            ("pool",),
        )
        lines += prom.gauge(
            "jaxlora_adapter_pool_pages_used",
            "Used pages of each adapter page pool.",
            {(axis,): u.used_pages for axis, u in pools.items()},
            ("pool",),
        )
        lines += prom.gauge(
            "jaxlora_adapter_pool_usage_ratio",
            "Used fraction of each adapter page pool.",
            {(axis,): u.utilization for axis, u in pools.items()},
            ("pool",),
        )
        lines += prom.gauge(
            "jaxlora_adapters_registered",
            "Adapters registered (servable).",
            len(self.adapters.store),
        )
        lines += prom.gauge(
            "jaxlora_adapters_resident",
            "Adapter versions holding pages of the GPU pool.",
            manager.resident,
        )
        lines += prom.gauge(
            "jaxlora_adapters_referenced",
            "Resident adapters used by at least one request.",
            manager.referenced,
        )
        lines += prom.gauge("jaxlora_adapters_pinned", "Pinned adapters.", manager.pinned)
        lines += prom.counter_snapshot(
            "jaxlora_adapter_hits_total",
            "Adapter acquisitions that found it resident.",
            manager.hits,
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_misses_total",
            "Adapter acquisitions that had to load it.",
            manager.misses,
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_evictions_total",
            "Adapters evicted from the GPU pool.",
            manager.evictions,
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_load_failures_total",
            "Adapter loads that failed.",
            manager.load_failures,
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_bytes_copied_total",
            "Bytes copied from host memory to the adapter pools.",
            manager.bytes_copied,
        )
        lines += prom.gauge(
            "jaxlora_adapter_load_seconds",
            "Seconds the last load of each adapter took, from the miss until its pages were ready.",
            {(name,): s for name, s in manager.load_seconds.items()},
            ("adapter",),
        )
        store = self.adapters.store.stats()
        lines += prom.gauge(
            "jaxlora_adapter_host_bytes",
            "Host RAM held by adapters' packed weights (disk-backed and in-memory ones).",
            store.host_bytes,
        )
        if store.host_budget_bytes is not None:
            lines += prom.gauge(
                "jaxlora_adapter_host_budget_bytes",
                "The most host RAM disk-backed adapters may hold (--adapter_host_memory).",
                store.host_budget_bytes,
            )
        lines += prom.gauge(
            "jaxlora_adapters_in_host_memory",
            "Adapters whose packed weights are in host RAM.",
            store.cached,
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_disk_reads_total", "Adapter weights read from disk.", store.loads
        )
        lines += prom.counter_snapshot(
            "jaxlora_adapter_host_drops_total",
            "Adapters dropped from host RAM back to disk under --adapter_host_memory.",
            store.drops,
        )
        memory = memory_report(jax.local_devices())
        if memory:  # (JAX's CPU backend reports none)
            lines += prom.gauge(
                "jaxlora_device_memory_bytes",
                "Each device's memory as JAX reports it: in use, peak, and the allocator's limit.",
                memory,
                ("device", "kind"),
            )
        lines += prom.counter_snapshot(
            "jaxlora_engine_steps_total", "Engine iterations that ran the model.", stats.steps
        )
        lines += prom.counter_snapshot(
            "jaxlora_engine_preemptions_total",
            "Requests preempted (KV pool full), recomputed later.",
            stats.preemptions,
        )
        lines += prom.counter_snapshot(
            "jaxlora_engine_deadline_aborts_total",
            "Requests dropped by admission control (deadline).",
            stats.deadline_aborts,
        )
        host = dict(stats.host_seconds)  # one copy (the engine thread adds to it)
        lines += prom.counter_snapshot(
            "jaxlora_engine_host_seconds_total",
            "Host seconds of engine iterations, per phase: schedule, build, dispatch, append "
            "(the host's own work) and wait (blocked on the device's tokens).",
            {(phase,): seconds for phase, seconds in host.items()},
            ("phase",),
        )
        cpu = dict(stats.host_cpu_seconds)
        lines += prom.counter_snapshot(
            "jaxlora_engine_host_cpu_seconds_total",
            "The engine thread's CPU seconds in the same phases: a phase far above its CPU "
            "time waited (on the device, or on the interpreter lock this server also takes).",
            {(phase,): seconds for phase, seconds in cpu.items()},
            ("phase",),
        )
        lines += prom.gauge(
            "jaxlora_engine_step_seconds",
            "Moving average of the duration of one engine iteration.",
            stats.step_time_ema,
        )
        lines += prom.gauge(
            "jaxlora_engine_ready", "1 once the engine is warm and running.", 1 if self.ready else 0
        )
        return "\n".join(lines) + "\n"

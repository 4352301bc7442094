"""Assembling a server from command-line style settings: model, adapters, engine sizes.

``LaunchConfig`` is everything ``scripts/serve.py`` takes; ``build_state`` turns it into a
ServingState. Sizes left at None get a heuristic default from the model and the backend: on CPU
few batch buckets (each compiles for seconds there), on GPU the engine's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex

import jax
import jax.numpy as jnp

from jaxlora import demo
from jaxlora.config import LoraPoolConfig, ModelConfig
from jaxlora.engine import EngineConfig, KVCacheConfig, RunnerConfig
from jaxlora.engine.kv_cache import kv_page_bytes as page_bytes
from jaxlora.engine.kv_cache import kv_pool_dtype, pages_held_at_most
from jaxlora.errors import ConfigError, JaxloraError
from jaxlora.formats.hub_cache import resolve_local
from jaxlora.server.config import ServerConfig
from jaxlora.server.device_memory import (
    DeviceMemory,
    KVBudget,
    adapter_pool_bytes,
    check_utilization,
    decode_attention_bytes,
    device_memory,
    host_bytes_per_device,
    kv_budget,
    prefill_attention_bytes,
    reserve_device_memory,
    step_working_bytes,
)
from jaxlora.server.keys import KeysFile, check_keys, model_matches, with_server_key
from jaxlora.server.state import ServingState, reserved_name_message
from pallas_kernels import layout
from pallas_kernels.lora_matmul import MatmulConfig
from pallas_kernels.sgmv import SgmvConfig

log = logging.getLogger("jaxlora.server")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# LaunchConfig's sizes (ints >= 1 where given), each also its flag's name.
SIZE_FIELDS = (
    "max_batch",
    "max_prefill_rows",
    "prefill_chunk",
    "max_num_tokens",
    "page_size",
    "kv_pages",
    "max_model_len",
)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """model: "" (the embedded demo), a preset name, a HF directory or an orbax checkpoint.
    lora_modules: "name=path" or "path" (named after its directory) PEFT adapters;
    lora_dirs: directories whose every sub-directory is an adapter (named after it).
    pinned_adapters: registered adapters kept resident in the GPU pool from the start, never
    evicted (no cold load for them; their pages are taken from everyone else's).
    Engine sizes (None: heuristic default, see engine_config_for)."""

    model: str = ""
    served_model_name: str = ""
    # False: the base model alone (vLLM's default): no adapter source or pool size may be
    # given, and the adapter pools shrink to one page each (their memory goes to the KV cache).
    enable_lora: bool = True
    lora_modules: tuple[str, ...] = ()
    lora_dirs: tuple[str, ...] = ()
    pinned_adapters: tuple[str, ...] = ()
    allowed_adapter_roots: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # ServerConfig.allowed_origins (CORS)
    allow_credentials: bool = False  # ServerConfig.allow_credentials (CORS)
    allowed_methods: tuple[str, ...] = ("*",)  # ServerConfig.allowed_methods (CORS)
    allowed_headers: tuple[str, ...] = ("*",)  # ServerConfig.allowed_headers (CORS)
    return_tokens_as_token_ids: bool = False  # ServerConfig.return_tokens_as_token_ids
    enable_prompt_tokens_details: bool = False  # ServerConfig.enable_prompt_tokens_details
    docs: bool = True  # ServerConfig.docs (False: vLLM's --disable-fastapi-docs)
    max_logprobs: int = 20  # ServerConfig.max_logprobs (vLLM's --max-logprobs)
    response_role: str = "assistant"  # ServerConfig.response_role (vLLM's --response-role)
    log_requests: bool = False  # ServerConfig.log_requests
    load_adapters_on_demand: bool = False  # ServerConfig.load_adapters_on_demand
    max_request_merges: int = 8  # ServerConfig.max_request_merges
    stream_interval: int = 1  # ServerConfig.stream_interval
    switch_interval_ms: float = 0.0  # ServerConfig.switch_interval_s, in ms (0: Python's own)
    enable_prefix_caching: bool = False  # KVCacheConfig.prefix_caching
    kv_cache_dtype: str = "auto"  # KVCacheConfig.cache_dtype: "auto" or an fp8 format
    # The tokenizer's directory or a Hub id in the local cache, in place of the model's own
    # ("": the model's; vLLM's --tokenizer).
    tokenizer: str = ""
    # A jinja2 chat template for the base model, or a file holding one, in place of its
    # tokenizer's ("": the tokenizer's own; vLLM's --chat-template).
    chat_template: str = ""
    # Where requests' sampling defaults come from (vLLM's --generation-config): "auto" the
    # model directory's generation_config.json, "none" OpenAI's defaults, or a directory or
    # file holding one (ServerConfig.sampling_defaults).
    generation_config: str = "auto"
    trust_request_chat_template: bool = False  # ServerConfig.trust_request_chat_template
    tool_call_parser: str = ""  # ServerConfig.tool_call_parser ("": none)
    # ServerConfig.auto_tool_choice (None: on; True needs tool_call_parser, as vLLM's does)
    enable_auto_tool_choice: bool | None = None
    reasoning_parser: str = ""  # ServerConfig.reasoning_parser ("": none)
    api_key: str | None = None
    api_keys_file: str = ""  # ServerConfig.api_keys: tenants' keys (jaxlora.server.keys)
    dtype: str = "float32"
    seed: int = 0
    tensor_parallel_size: int = 1
    load_workers: int = 2
    first_token_deadline_s: float | None = None
    max_body_mib: int = 32  # ServerConfig.max_body_bytes, in MiB: larger request bodies get 413
    max_batch: int | None = None
    max_prefill_rows: int | None = None
    prefill_chunk: int | None = None
    # RunnerConfig.prefill_key_block: prefill attention over longer page tables runs block by
    # block up to the batch's longest row (None: RunnerConfig's default; 0: always one pass).
    prefill_key_block: int | None = None
    # RunnerConfig.prefill_context_buckets (None: its default; empty: every prefill step reads
    # the whole page table).
    prefill_context_buckets: tuple[int, ...] | None = None
    max_num_tokens: int | None = None
    max_waiting: int | None = None
    page_size: int | None = None
    kv_pages: int | None = None
    # The KV cache's bytes on each device (vLLM's --kv-cache-memory-bytes): the page count is
    # what fits, at the cache dtype's bytes a page; instead of kv_pages.
    kv_cache_memory_bytes: int | None = None
    # The share of each device's memory the server may fill (vLLM's --gpu-memory-utilization):
    # the KV cache gets what the weights, adapter pools and a step's working memory leave
    # (jaxlora.server.device_memory); instead of kv_pages and kv_cache_memory_bytes.
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    adapter_pool_pages: int | None = None
    # "pool=pages" items for pools sized apart from adapter_pool_pages (LoraPoolConfig.axis_pages).
    adapter_pool_axis_pages: tuple[str, ...] = ()
    # The most bytes of disk-backed adapters' weights kept in host RAM (LoRAX's and vLLM's
    # --max-cpu-loras, in bytes; None: no limit; AdapterStoreConfig.host_budget_bytes).
    adapter_host_memory_bytes: int | None = None
    # vLLM's --max-cpu-loras: that budget as this many adapters of max_rank on every module, in
    # dtype (adapter_host_bytes); not with adapter_host_memory_bytes.
    max_cpu_loras: int | None = None
    rows_per_page: int | None = None
    max_rank: int | None = None
    max_slots: int | None = None
    layer_loop: str = "scan"  # RunnerConfig.layer_loop
    scan_unroll: int | None = None  # RunnerConfig.scan_unroll: layers per scan iteration
    xla_options: tuple[tuple[str, object], ...] = ()  # RunnerConfig.xla_options
    fuse_projections: bool = True  # RunnerConfig.fuse_projections
    projection_kernel: str = "auto"  # RunnerConfig.projection_kernel
    sgmv: SgmvConfig | None = None  # RunnerConfig.sgmv: the SGMV kernels' tuning
    matmul: MatmulConfig | None = None  # RunnerConfig.matmul: lora_matmul's tuning
    kv_write: str = "pallas"  # RunnerConfig.kv_write: who rotates q, k and writes K/V
    residual_norm: str = "pallas"  # RunnerConfig.residual_norm: residual adds + norms in Pallas
    prefill_attention: str = "auto"  # RunnerConfig.prefill_attention: "auto", "xla" or "cudnn"
    deterministic: bool = True  # RunnerConfig.deterministic: no atomic adds in a step
    async_scheduling: bool = True  # EngineConfig.async_scheduling
    scheduling_policy: str = "fcfs"  # EngineConfig.scheduling_policy: fcfs, priority or fair
    # EngineConfig.fair_share_weights by served name (the base model's name or an adapter's)
    fair_share_weights: tuple[tuple[str, float], ...] = ()
    fair_share_by: str = "model"  # ServerConfig.fair_share_by: "model" or "key"
    metrics_need_key: bool = False  # ServerConfig.metrics_need_key

    def __post_init__(self):
        if (
            not isinstance(self.max_body_mib, int)
            or isinstance(self.max_body_mib, bool)
            or self.max_body_mib < 1
        ):
            raise ConfigError(f"max_body_mib: expected an int >= 1, got {self.max_body_mib!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.max_cpu_loras is not None:
            if (
                isinstance(self.max_cpu_loras, bool)
                or not isinstance(self.max_cpu_loras, int)
                or self.max_cpu_loras < 1
            ):
                raise ConfigError(
                    f"--max_cpu_loras: expected an int >= 1 (adapters), got {self.max_cpu_loras!r}"
                )
            if self.adapter_host_memory_bytes is not None:
                raise ConfigError(
                    "--max_cpu_loras and --adapter_host_memory both bound the adapters' host "
                    "RAM: expected one of them"
                )
        for field, least in (("kv_cache_memory_bytes", 1), ("adapter_host_memory_bytes", 0)):
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ConfigError(
                    f"{field}: expected None or an int >= {least} (bytes), got {value!r}"
                )
        # (checked here, before engine_config_for divides by them or a step is shaped by them)
        for field in SIZE_FIELDS:
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"--{field}: expected an int >= 1, got {value!r}")
        if self.gpu_memory_utilization is not None:
            check_utilization(self.gpu_memory_utilization)
        sizers = [
            (name, getattr(self, name))
            for name in ("kv_pages", "kv_cache_memory_bytes", "gpu_memory_utilization")
            if getattr(self, name) is not None
        ]
        if len(sizers) > 1:
            (first, a), (second, b) = sizers[:2]
            raise ConfigError(f"{first} ({a}) and {second} ({b}) both size the KV cache: give one")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(
                f"tensor_parallel_size: expected an int >= 1, got {self.tensor_parallel_size!r}"
            )


def parse_axis_pages(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, int], ...]:
    """--adapter_pool_axis_pages items ("mlp=16") as LoraPoolConfig.axis_pages pairs; each
    entry is checked as it is added, by LoraPoolConfig's own check of axis_pages."""
    pairs: tuple[tuple[str, int], ...] = ()
    for item in items:
        axis, sep, pages = (part.strip() for part in item.partition("="))
        ok = bool(sep) and pages.isdigit()
        if ok:
            try:
                LoraPoolConfig(axis_pages=(*pairs, (axis, int(pages))))
            except ConfigError:
                ok = False
        if not ok:
            raise ConfigError(
                f"--adapter_pool_axis_pages entry {item!r}: expected pool=pages, each pool once "
                f"and one of {', '.join(layout.POOL_AXES)}, pages a positive int (e.g. mlp=16)"
            )
        pairs = (*pairs, (axis, int(pages)))
    return pairs


def parse_lora_modules(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{"name": path} from "name=path" or "path" entries (a path's name is its directory)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.basename(os.path.normpath(spec))
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(
                f"--lora_modules entry {spec!r}: expected name=path or a PEFT adapter directory"
            )
        if name in out:
            raise ConfigError(
                f"--lora_modules: adapter name {name!r} given twice ({out[name]} and {path})"
            )
        out[name] = path
    return out


def _refuse_reserved_names(names, flag: str) -> None:
    """ConfigError naming flag for an adapter name reserved for per-request merges."""
    for name in names:
        reserved = reserved_name_message(name)
        if reserved:
            raise ConfigError(f"{flag}: {reserved}")


def parse_fair_share_weights(specs: tuple[str, ...] | list[str]) -> tuple[tuple[str, float], ...]:
    """((name, weight), ...) from "name=weight" entries (--fair_share_weights)."""
    out = []
    for spec in specs:
        name, sep, weight = spec.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not name.strip() or value is None:
            raise ConfigError(
                f"--fair_share_weights entry {spec!r}: expected name=weight (an adapter's or "
                "the base model's name, a number > 0)"
            )
        out.append((name.strip(), value))
    return tuple(out)


def kv_page_bytes(model: ModelConfig, launch: LaunchConfig, page_size: int) -> int:
    """Bytes of one KV page (K and V, every layer) on each device: tensor parallelism splits
    the KV heads, and the cache dtype (``launch.kv_cache_dtype``) sets the bytes an element."""
    dtype = kv_pool_dtype(launch.kv_cache_dtype, DTYPES[launch.dtype])
    return page_bytes(model, page_size, dtype, shards=launch.tensor_parallel_size)


def kv_budget_for(
    model: ModelConfig,
    launch: LaunchConfig,
    pool: LoraPoolConfig,
    runner: RunnerConfig,
    *,
    max_model_len: int,
    max_num_tokens: int,
    memory: list[DeviceMemory] | None = None,
    pending_bytes: int = 0,
) -> KVBudget:
    """How launch.gpu_memory_utilization's share of each tensor-parallel device is spent,
    the KV cache's bytes last (jaxlora.server.device_memory): the step's working memory is
    that of the runner's batch and prefill steps over tables of max_model_len keys."""
    shards = launch.tensor_parallel_size
    itemsize = jnp.dtype(DTYPES[launch.dtype]).itemsize
    if memory is None:
        memory = device_memory(jax.devices()[:shards])
    budget = kv_budget(
        launch.gpu_memory_utilization,
        memory,
        pending=pending_bytes,
        adapter_pools=adapter_pool_bytes(model, pool, DTYPES[launch.dtype], shards=shards),
        working=step_working_bytes(
            model,
            max_num_tokens=max_num_tokens,
            max_batch=runner.max_batch,
            shards=shards,
            prefill_attention=prefill_attention_bytes(
                model,
                rows=runner.max_prefill_rows,
                chunk=runner.prefill_chunk,
                max_model_len=max_model_len,
                key_block=runner.prefill_key_block,
                itemsize=itemsize,
                shards=shards,
            ),
            # (a tensor-parallel engine's steps run the jnp path: jaxlora.engine.engine)
            decode_attention=decode_attention_bytes(
                model,
                rows=runner.max_batch,
                max_model_len=max_model_len,
                itemsize=itemsize,
                shards=shards,
            )
            if shards > 1
            else 0,
        ),
    )
    return budget


# LaunchConfig fields that name adapters or size their pools, with their flags: none may be
# given with --noenable_lora.
_ADAPTER_FIELDS = (
    ("lora_modules", "--lora_modules"),
    ("lora_dirs", "--lora_dirs"),
    ("pinned_adapters", "--pinned_adapters"),
    ("allowed_adapter_roots", "--allowed_adapter_roots"),
    ("load_adapters_on_demand", "--load_adapters_on_demand"),
    ("adapter_pool_pages", "--adapter_pool_pages"),
    ("adapter_pool_axis_pages", "--adapter_pool_axis_pages"),
    ("max_rank", "--max_rank (--max_lora_rank)"),
    ("max_slots", "--max_slots (--max_loras)"),
    ("rows_per_page", "--rows_per_page"),
    ("max_cpu_loras", "--max_cpu_loras (--max-cpu-loras)"),
    ("adapter_host_memory_bytes", "--adapter_host_memory"),
)


def adapter_host_bytes(model: ModelConfig, rank: int, dtype: str) -> int:
    """Host bytes of one adapter of ``rank`` on every module of ``model``, in ``dtype``: A and
    B of each of the 7 projections, every layer."""
    widths = sum(fan_in + fan_out for fan_in, fan_out in model.module_shapes().values())
    return rank * widths * model.num_layers * jnp.dtype(dtype).itemsize


def adapter_host_budget(
    launch: LaunchConfig, model: ModelConfig, engine_config: EngineConfig
) -> int | None:
    """The adapters' host RAM budget in bytes: --adapter_host_memory, or --max_cpu_loras
    adapters of the pool's max_rank (vLLM's count; ``adapter_host_bytes``); None: no limit."""
    if launch.max_cpu_loras is None:
        return launch.adapter_host_memory_bytes
    per_adapter = adapter_host_bytes(model, engine_config.lora_pool.max_rank, launch.dtype)
    budget = launch.max_cpu_loras * per_adapter
    log.info(
        "--max_cpu_loras %d: adapters' host RAM budget %.2f GiB (%.1f MiB an adapter of rank %d "
        "on every module)",
        launch.max_cpu_loras,
        budget / 2**30,
        per_adapter / 2**20,
        engine_config.lora_pool.max_rank,
    )
    return budget


def check_no_adapter_flags(launch: LaunchConfig) -> None:
    """With --noenable_lora (the base model alone) an adapter flag is a contradiction: refused,
    naming it, rather than silently serving without the adapters it names."""
    given = [
        flag for field, flag in _ADAPTER_FIELDS if getattr(launch, field) not in (None, (), False)
    ]
    if given:
        raise ConfigError(
            f"--noenable_lora serves the base model alone, but {', '.join(given)} "
            f"{'was' if len(given) == 1 else 'were'} given (expected --enable_lora, the "
            "default, to serve adapters)"
        )


def check_tool_flags(launch: LaunchConfig) -> None:
    """--enable_auto_tool_choice asks for calls read back, which only a parser does (vLLM
    refuses the flag without --tool-call-parser too)."""
    if launch.enable_auto_tool_choice and not launch.tool_call_parser:
        raise ConfigError(
            "--enable_auto_tool_choice: the model's tool calls are read back by a parser, but "
            "no --tool_call_parser was given (expected hermes, llama3_json, mistral or pythonic)"
        )


def engine_config_for(
    model: ModelConfig,
    launch: LaunchConfig,
    *,
    backend: str | None = None,
    warmup: bool = False,
    memory: list[DeviceMemory] | None = None,
    pending_bytes: int = 0,
) -> EngineConfig:
    """The engine sizes of launch, defaults filled in for the model and the backend.

    With launch.gpu_memory_utilization the KV pages are what the devices' memory leaves
    (``memory``: the tensor-parallel devices' reports, read from JAX when None; pending_bytes:
    weights still on the host, per device)."""
    backend = backend or jax.default_backend()
    base_name = launch.served_model_name or default_model_name(launch.model)
    on_cpu = backend == "cpu"
    runner_default, kv_default, pool_default = RunnerConfig(), KVCacheConfig(), LoraPoolConfig()

    def pick(value, default):
        return default if value is None else value

    max_batch = pick(launch.max_batch, 8 if on_cpu else runner_default.max_batch)
    max_model_len = pick(launch.max_model_len, min(model.context_length, 512 if on_cpu else 4096))
    if max_model_len > model.context_length:
        stretched = (
            f", {model.rope_scaling.rope_type} RoPE scaling x{model.rope_scaling.factor:g}"
            if model.context_length > model.max_position_embeddings
            else ""
        )
        raise ConfigError(
            f"max_model_len {max_model_len}: the model's context is {model.context_length} "
            f"(max_position_embeddings {model.max_position_embeddings}{stretched})"
        )
    page_size = pick(launch.page_size, kv_default.page_size)
    runner = RunnerConfig(
        max_batch=max_batch,
        prefill_chunk=pick(launch.prefill_chunk, runner_default.prefill_chunk),
        max_prefill_rows=pick(
            launch.max_prefill_rows, 1 if on_cpu else runner_default.max_prefill_rows
        ),
        layer_loop=launch.layer_loop,
        scan_unroll=launch.scan_unroll,
        xla_options=launch.xla_options,
        fuse_projections=launch.fuse_projections,
        projection_kernel=launch.projection_kernel,
        sgmv=launch.sgmv,
        matmul=launch.matmul,
        kv_write=launch.kv_write,
        residual_norm=launch.residual_norm,
        prefill_attention=launch.prefill_attention,
        deterministic=launch.deterministic,
        prefill_key_block=(
            runner_default.prefill_key_block
            if launch.prefill_key_block is None
            else launch.prefill_key_block or None
        ),
        prefill_context_buckets=pick(
            launch.prefill_context_buckets, runner_default.prefill_context_buckets
        ),
    )
    # The pages one sequence of max_model_len holds at once (with a sliding window, those of
    # its window and one prefill chunk: the engine releases the pages before it).
    pages_per_seq = pages_held_at_most(
        max_model_len, page_size, model.attention_window, runner.prefill_chunk
    )
    if launch.enable_lora:
        pool = LoraPoolConfig(
            max_rank=pick(launch.max_rank, pool_default.max_rank),
            rows_per_page=pick(launch.rows_per_page, pool_default.rows_per_page),
            pages_per_pool=pick(launch.adapter_pool_pages, pool_default.pages_per_pool),
            max_slots=pick(launch.max_slots, min(max_batch, pool_default.max_slots)),
            axis_pages=parse_axis_pages(launch.adapter_pool_axis_pages),
        )
    else:
        check_no_adapter_flags(launch)
        # (the step programs keep their LoRA inputs; no adapter ever takes these pages)
        pool = LoraPoolConfig(
            max_rank=pool_default.rows_per_page,
            rows_per_page=pool_default.rows_per_page,
            pages_per_pool=1,
            max_slots=1,
        )
    max_num_tokens = pick(
        launch.max_num_tokens, max(EngineConfig().max_num_tokens, max_batch + runner.prefill_chunk)
    )
    kv_cache_memory_bytes, budget = launch.kv_cache_memory_bytes, None
    if launch.gpu_memory_utilization is not None:
        budget = kv_budget_for(
            model,
            launch,
            pool,
            runner,
            max_model_len=max_model_len,
            max_num_tokens=max_num_tokens,
            memory=memory,
            pending_bytes=pending_bytes,
        )
        kv_cache_memory_bytes = budget.kv_cache
    if kv_cache_memory_bytes is not None:
        kv_source = (
            "kv_cache_memory_bytes"
            if launch.gpu_memory_utilization is None
            else f"gpu_memory_utilization {launch.gpu_memory_utilization} leaves"
        )
        bytes_per_page = kv_page_bytes(model, launch, page_size)
        kv_pages = kv_cache_memory_bytes // bytes_per_page
        if kv_pages < pages_per_seq:
            raise ConfigError(
                f"{kv_source} {kv_cache_memory_bytes}: holds {kv_pages} KV "
                f"pages of {bytes_per_page} bytes on each device; one "
                f"sequence of max_model_len {max_model_len} needs {pages_per_seq}"
            )
        if budget is not None:
            log.info(
                "gpu_memory_utilization %s: %s: %d KV pages of %d tokens",
                launch.gpu_memory_utilization,
                budget.describe(),
                kv_pages,
                page_size,
            )
    else:
        # Half of the batch at full length: preemption covers the rare moment when more is
        # needed.
        kv_pages = pick(launch.kv_pages, max(pages_per_seq, max_batch * pages_per_seq // 2))
    return EngineConfig(
        kv=KVCacheConfig(
            page_size=page_size,
            num_pages=kv_pages,
            max_model_len=max_model_len,
            prefix_caching=launch.enable_prefix_caching,
            cache_dtype=launch.kv_cache_dtype,
        ),
        runner=runner,
        lora_pool=pool,
        max_num_tokens=max_num_tokens,
        max_waiting=pick(launch.max_waiting, EngineConfig().max_waiting),
        warmup=warmup,
        async_scheduling=launch.async_scheduling,
        scheduling_policy=launch.scheduling_policy,
        # (the engine's tenant of the base model is "")
        fair_share_weights=tuple(
            ("" if name == base_name and launch.fair_share_by == "model" else name, weight)
            for name, weight in launch.fair_share_weights
        ),
    )


def generation_defaults_for(setting: str, model: str) -> dict[str, float | int]:
    """--generation_config: "auto" reads the model directory's generation_config.json (none:
    no defaults), "none" keeps OpenAI's, anything else is a directory or file holding one. The
    defaults found are logged."""
    from jaxlora.formats.hf import GENERATION_CONFIG_FILE, read_generation_defaults

    if setting == "none":
        return {}
    if setting == "auto":
        if not os.path.isdir(model):
            return {}
        source = model
    elif os.path.exists(setting):
        source = setting
    else:
        raise ConfigError(
            f"--generation_config={setting!r}: expected auto, none, or a directory or file "
            f"holding a {GENERATION_CONFIG_FILE}"
        )
    defaults = read_generation_defaults(source)
    if defaults:
        log.info(
            "sampling defaults from %s's %s: %s (a request's own values win; "
            "--generation_config=none for OpenAI's)",
            source,
            GENERATION_CONFIG_FILE,
            ", ".join(f"{k}={v}" for k, v in defaults.items()),
        )
    return defaults


def apply_chat_template_flag(tokenizer, value: str) -> None:
    """--chat_template: a file holding a jinja2 template, or the template itself, replaces the
    tokenizer's; ConfigError naming the flag for a model without a tokenizer, a value that is
    neither, or a template jinja2 cannot parse."""
    if tokenizer is None:
        raise ConfigError(
            "--chat_template: the model has no tokenizer to give it to (expected a model "
            "directory with a tokenizer.json)"
        )
    if os.path.isfile(value):
        from jaxlora.tokenizer import read_text

        tokenizer.set_chat_template(read_text(value), f"--chat_template={value}")
    elif "{{" in value or "{%" in value:
        tokenizer.set_chat_template(value, "--chat_template")
    else:
        raise ConfigError(
            f"--chat_template={value!r}: neither a file nor a jinja2 template (expected a path "
            "to a template file, or a template with {{ ... }} or {% ... %})"
        )


def default_model_name(model: str) -> str:
    if not model:
        return demo.DEMO_MODEL_NAME
    if os.path.isdir(model):
        return os.path.basename(os.path.normpath(model))
    return model


def tokenizer_for(source: str, model: ModelConfig):
    """--tokenizer: the tokenizer at source (a directory holding tokenizer.json, the file, or a
    Hub id in the local cache); ConfigError naming the flag when it cannot be read or has
    tokens the model's embedding does not."""
    from jaxlora.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(resolve_local(source))
    except JaxloraError as e:
        raise ConfigError(f"--tokenizer={source!r}: {e}") from None
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"--tokenizer={source!r}: {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary ({model.vocab_size}): expected the model's own tokenizer or one of "
            "its family"
        )
    return tokenizer


def build_state(launch: LaunchConfig, *, warmup: bool = False) -> ServingState:
    """Loads the model and the adapters of launch and wraps them for serving (the engine is
    not started: create_app's start-up does it)."""
    from jaxlora.llm import LLM, load_base_model
    from jaxlora.model import fuse_projections

    if launch.gpu_memory_utilization is not None:
        reserve_device_memory(launch.gpu_memory_utilization)
    if not launch.enable_lora:
        check_no_adapter_flags(launch)
    check_tool_flags(launch)
    adapters = parse_lora_modules(launch.lora_modules)
    _refuse_reserved_names(adapters, "--lora_modules")
    model = resolve_local(launch.model)  # a Hub id: its snapshot in the local cache
    if not model:
        demo.check_assets()
        model = demo.model_dir()
        if launch.enable_lora:
            adapters = {**demo.adapter_dirs(), **adapters}
    dtype = DTYPES[launch.dtype]
    sampling_defaults = generation_defaults_for(launch.generation_config, model)
    # Fused as they are made (a preset's, on the device) or loaded (a checkpoint's, on the
    # host), one group a tensor-parallel device, while nothing else is on the device: the
    # engine would fuse them too, but with this frame still holding the separate kernels, so
    # that q|k|v and gate|up of a preset's weights sat on the device twice while the KV cache
    # was allocated (llama-2-7b: 8.4 GiB; an H100 run at --gpu_memory_utilization=0.9 ran
    # out); and fusing on the device after the fact leaves those 8.4 GiB as a hole below the
    # fused kernels, which the K and V pools cannot use (jaxlora.server.device_memory).
    groups = launch.tensor_parallel_size if launch.fuse_projections else 0
    config, params, tokenizer = load_base_model(
        model, seed=launch.seed, dtype=dtype, fuse_groups=groups
    )
    if launch.tokenizer:
        tokenizer = tokenizer_for(launch.tokenizer, config)
    if launch.chat_template:
        apply_chat_template_flag(tokenizer, launch.chat_template)
    if groups:
        params = fuse_projections(params, groups=groups)  # a checkpoint's, on the host
    pending_bytes = 0
    if launch.gpu_memory_utilization is not None:
        pending_bytes = host_bytes_per_device(params, launch.tensor_parallel_size)
    engine_config = engine_config_for(config, launch, warmup=warmup, pending_bytes=pending_bytes)
    llm = LLM(
        config,
        params=params,
        tokenizer=tokenizer,
        engine_config=engine_config,
        dtype=dtype,
        seed=launch.seed,
        load_workers=launch.load_workers,
        tp=launch.tensor_parallel_size,
        adapter_host_budget_bytes=adapter_host_budget(launch, config, engine_config),
    )
    for name, path in adapters.items():
        llm.adapters.register(name, path)
    for root in launch.lora_dirs:
        llm.adapters.register_root(root)
    _refuse_reserved_names(llm.adapters.store.names(), "--lora_dirs")  # (its directories)
    for name in launch.pinned_adapters:
        if name not in llm.adapters.store:
            raise ConfigError(
                f"--pinned_adapters: adapter {name!r} is not registered (expected one of "
                f"{llm.adapters.store.names()})"
            )
        try:
            llm.adapters.pin(name, wait=True)
        except JaxloraError as e:
            raise ConfigError(
                f"--pinned_adapters: adapter {name!r} cannot stay resident ({e})"
            ) from None
    keys_file = None
    if launch.api_keys_file:
        # (a reloaded file is checked beside --api_key as ServerConfig checks the first one)
        keys_file = KeysFile(
            launch.api_keys_file,
            check=lambda keys: check_keys(
                with_server_key(keys, launch.api_key or None), launch.api_keys_file
            ),
        )
    server_config = ServerConfig(
        model_name=launch.served_model_name or default_model_name(launch.model),
        api_key=launch.api_key or None,
        api_keys=keys_file.keys if keys_file is not None else (),
        adapter_roots=tuple(launch.allowed_adapter_roots),
        load_adapters_on_demand=launch.load_adapters_on_demand,
        max_request_merges=launch.max_request_merges,
        stream_interval=launch.stream_interval,
        switch_interval_s=launch.switch_interval_ms / 1e3 if launch.switch_interval_ms else None,
        tool_call_parser=launch.tool_call_parser or None,
        auto_tool_choice=launch.enable_auto_tool_choice is not False,
        reasoning_parser=launch.reasoning_parser or None,
        first_token_deadline_s=launch.first_token_deadline_s,
        max_body_bytes=launch.max_body_mib * 2**20,
        allowed_origins=tuple(launch.allowed_origins),
        allow_credentials=launch.allow_credentials,
        allowed_methods=tuple(launch.allowed_methods),
        allowed_headers=tuple(launch.allowed_headers),
        return_tokens_as_token_ids=launch.return_tokens_as_token_ids,
        enable_prompt_tokens_details=launch.enable_prompt_tokens_details,
        docs=launch.docs,
        max_logprobs=launch.max_logprobs,
        response_role=launch.response_role,
        log_requests=launch.log_requests,
        fair_share_by=launch.fair_share_by,
        metrics_need_key=launch.metrics_need_key,
        sampling_defaults=tuple(sampling_defaults.items()),
        trust_request_chat_template=launch.trust_request_chat_template,
    )
    if server_config.model_name in llm.adapters.store:
        raise ConfigError(
            f"served model name {server_config.model_name!r} is also an "
            "adapter's name; rename one (--served_model_name)"
        )
    state = ServingState(llm, server_config, keys_file=keys_file)
    for warning in unmatched_names(state, launch):
        log.warning("%s", warning)
    return state


def unmatched_names(state: ServingState, launch: LaunchConfig) -> list[str]:
    """Names in the tenant settings that match no model served at start-up: most likely typos
    (adapters loaded later may still match them, so they are warned about, not refused)."""
    models = [state.config.model_name, *state.adapters.store.names()]
    warnings = []
    for key in state.config.api_keys:
        for pattern in key.models:
            if not any(model_matches(m, pattern) for m in models):
                warnings.append(
                    f"--api_keys_file: key {key.name!r}: models pattern {pattern!r} matches no "
                    "model served now"
                )
    if launch.fair_share_by == "key":
        names, what = {k.name for k in state.config.keys}, "API key"
    else:
        names, what = set(models), "model"
    for name, _ in launch.fair_share_weights:
        if name not in names:
            warnings.append(f"--fair_share_weights: {name!r} names no {what} of this server")
    return warnings


def tls_options(certfile: str, keyfile: str) -> dict[str, str]:
    """uvicorn's TLS settings for --ssl_certfile / --ssl_keyfile ({}: plain HTTP). Both or
    neither; the pair is loaded here, before the model, so that a missing file or a key that
    does not belong to the certificate is a ConfigError naming the flags."""
    if not certfile and not keyfile:
        return {}
    if not (certfile and keyfile):
        raise ConfigError(
            "--ssl_certfile and --ssl_keyfile: give both (a PEM certificate chain and its "
            "private key) or neither"
        )
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"--ssl_certfile={certfile} --ssl_keyfile={keyfile}: cannot load the certificate "
            f"and its key ({e})"
        ) from None
    return {"ssl_certfile": certfile, "ssl_keyfile": keyfile}


def banner(state: ServingState, url: str) -> str:
    """What the server prints once it is ready: where it is and a request to paste."""
    config = state.config
    adapters = state.adapters.store.names()
    example_model = adapters[0] if adapters else config.model_name
    prompt = demo.DEMO_PROMPTS[0]
    body = json.dumps(
        {
            "model": example_model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    # The key itself never goes to stdout or logs: the example reads it from the environment.
    auth = ' \\\n  -H "Authorization: Bearer $JAXLORA_API_KEY"' if config.keys else ""
    shown = ", ".join(adapters[:8]) + (
        f", ... ({len(adapters)} in all)" if len(adapters) > 8 else ""
    )
    return "\n".join(
        [
            "",
            f"jaxlora is serving {config.model_name!r} at {url}/v1 (OpenAI-compatible)",
            f"  adapters: {shown or '(none yet)'}",
            f"  models: {url}/v1/models   health: {url}/health   metrics: {url}/metrics   "
            f"docs: {url}/docs",
            'Try it (set "model" to an adapter name or to the base model\'s'
            + ("; export JAXLORA_API_KEY=<a key of the server's>):" if config.keys else "):"),
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
            f"    -d {shlex.quote(body)}",
            "",
        ]
    )

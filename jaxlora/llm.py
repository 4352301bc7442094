"""The library API for JAX pipelines: ``LLM(...).generate(prompts, adapter=[...])``.

It assembles a base model (a preset with random weights, a HF directory or an orbax checkpoint),
an adapter store and manager (host memory + GPU page pool) and the engine.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import LoraPoolConfig, ModelConfig, is_int
from jaxlora.engine import Engine, EngineConfig, Request
from jaxlora.engine.engine import check_adapter_and_sampling, check_params, checked_token_ids
from jaxlora.errors import ConfigError, RequestError, UnknownAdapterError
from jaxlora.formats.hub_cache import is_repo_id, not_cached, resolve_local
from jaxlora.lora import LoraWeights
from jaxlora.memory import AdapterManager, AdapterManagerConfig, AdapterStore, AdapterStoreConfig
from jaxlora.sampling import SamplingParams
from jaxlora.tokenizer import Tokenizer, tiny_tokenizer


@dataclasses.dataclass
class CompletionOutput:
    """One sample of a prompt (vLLM's ``CompletionOutput``): ``Completion.outputs[index]``."""

    index: int
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    # vLLM's: the stop token id or stop string that ended it; None where EOS, max_tokens or an
    # error did
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None  # each output token's logprob (SamplingParams.logprobs)
    # SamplingParams.logprobs = n > 0: each output token's n most likely tokens and logprobs
    top_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None  # the sum of logprobs (None without them)
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """What ``LLM.generate`` returns for one prompt (vLLM's ``RequestOutput``): its samples in
    ``outputs`` (``SamplingParams.n`` of them, one by default), and the first sample's fields
    (token_ids, text, finish_reason, logprobs, top_logprobs, stop_reason) at the top level, as
    one-sample callers read them. error: the first sample's error that has one (None: none)."""

    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None  # each output token's logprob (SamplingParams.logprobs)
    error: str | None = None
    # SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None  # each prompt token's rank there
    # SamplingParams.logprobs = n > 0: each output token's n most likely tokens and logprobs
    top_logprobs: list[dict[int, float]] | None = None
    # Prompt tokens whose K/V were not computed for it: the prefix cache's (prefix_caching) or
    # those it shared with an earlier request of the same prompt (vLLM's num_cached_tokens)
    num_cached_tokens: int = 0
    stop_reason: int | str | None = None
    outputs: list[CompletionOutput] = dataclasses.field(default_factory=list)
    prompt: str | None = None  # the prompt's text where it was given as text (vLLM's)

    @property
    def prompt_token_ids(self) -> list[int]:
        """vLLM's name for ``prompt_ids``."""
        return self.prompt_ids

    @property
    def finished(self) -> bool:
        """vLLM's: always True here (``generate`` returns when every sample has finished)."""
        return True


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)``, as ``LLM.generate`` and
    ``LLM.chat`` take it (``lora_request=``): the adapter registered as ``lora_name``, or, where
    none is, the PEFT directory ``lora_path`` registered under that name on first use. The id is
    vLLM's and is not read here (adapters are named). vLLM's own LoRARequest objects work too."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


def _output(index: int, request: Request) -> CompletionOutput:
    logprobs = list(request.output_logprobs) if request.output_logprobs else None
    return CompletionOutput(
        index=index,
        request_id=request.request_id,
        token_ids=list(request.output_ids),
        text=request.text,
        finish_reason=str(request.finish_reason),
        stop_reason=request.stop_reason,
        logprobs=logprobs,
        top_logprobs=list(request.output_top_logprobs) if request.output_top_logprobs else None,
        cumulative_logprob=float(sum(logprobs)) if logprobs else None,
        error=request.error,
    )


def _prompt_text(prompt) -> str | None:
    """A generate prompt's text (vLLM's RequestOutput.prompt): None where it was token ids."""
    if isinstance(prompt, Mapping):
        prompt = prompt.get("prompt") if "prompt_token_ids" not in prompt else None
    return prompt if isinstance(prompt, str) else None


def _completion(samples: Sequence[Request], prompt: str | None = None) -> Completion:
    """One prompt's Completion from its samples' finished requests (the first one leads)."""
    first, outputs = samples[0], [_output(i, r) for i, r in enumerate(samples)]
    return Completion(
        request_id=first.request_id,
        adapter=first.adapter,
        prompt_ids=first.prompt_ids,
        token_ids=outputs[0].token_ids,
        text=outputs[0].text,
        finish_reason=outputs[0].finish_reason,
        logprobs=outputs[0].logprobs,
        error=next((o.error for o in outputs if o.error is not None), None),
        prompt_logprobs=first.prompt_logprobs,
        prompt_top_logprobs=first.prompt_top_logprobs,
        prompt_logprob_ranks=first.prompt_logprob_ranks,
        top_logprobs=outputs[0].top_logprobs,
        num_cached_tokens=first.num_cached_tokens,
        stop_reason=outputs[0].stop_reason,
        outputs=outputs,
        prompt=prompt,
    )


class _Progress:
    """vLLM's ``use_tqdm`` bar for ``generate``: the prompts whose samples have all finished,
    and the output tokens a second so far."""

    def __init__(self, tqdm, per_prompt: Sequence[Sequence[Request]]):
        self._per_prompt = per_prompt
        self._done = 0
        self._start = time.perf_counter()
        self._bar = tqdm(total=len(per_prompt), desc="Processed prompts", unit="prompt")

    def update(self) -> None:
        done = sum(all(r.finished for r in samples) for samples in self._per_prompt)
        if done > self._done:
            tokens = sum(len(r.output_ids) for samples in self._per_prompt for r in samples)
            seconds = max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"output {tokens / seconds:,.1f} toks/s", refresh=False)
            self._bar.update(done - self._done)
            self._done = done

    def close(self) -> None:
        self._bar.close()


def _tqdm(use_tqdm):
    """tqdm's class where ``use_tqdm`` asks for the bar, else None (checked before anything is
    queued)."""
    if not isinstance(use_tqdm, bool):
        raise RequestError(f"use_tqdm: expected a bool, got {use_tqdm!r:.100}")
    if not use_tqdm:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        raise ConfigError(
            "use_tqdm: the progress bar needs the tqdm package (pip install tqdm); "
            "expected use_tqdm=False without it"
        ) from None
    return tqdm


def _samples(sampling: SamplingParams) -> list[SamplingParams]:
    """A request's SamplingParams for each of sampling.n samples: sample i of a seeded one
    draws from seed + i (vLLM's children and the server's choices; the engine takes any int)."""
    if sampling.n == 1:
        return [sampling]
    return [
        dataclasses.replace(
            sampling, n=1, seed=None if sampling.seed is None else sampling.seed + i
        )
        for i in range(sampling.n)
    ]


def _prompt_list(prompts) -> list:
    """generate's prompts as a list, as vLLM reads them: one prompt (text, token ids or a
    ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` dict) or a sequence of them."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if hasattr(prompts, "__array__") and not isinstance(prompts, Sequence):
        prompts = np.asarray(prompts)  # (a numpy or JAX array: one prompt, or a batch's rows)
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise RequestError(
            "prompts: expected a prompt (text or token ids) or a list of them, "
            f"got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(is_int(t) for t in prompts):
        return [prompts]  # one prompt's token ids
    return prompts


# vLLM's LLM(...) engine arguments this LLM takes, and the serve.py size (LaunchConfig field)
# each one is: LLM(model, max_model_len=4096, max_lora_rank=64) sizes the engine as
# `serve.py --max-model-len 4096 --max-lora-rank 64` does (jaxlora.server.launch).
VLLM_ENGINE_ARGS: dict[str, str] = {
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_batch",
    "max_num_batched_tokens": "max_num_tokens",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "kv_cache_memory_bytes": "kv_cache_memory_bytes",
    "enable_prefix_caching": "enable_prefix_caching",
    "block_size": "page_size",
    "kv_cache_dtype": "kv_cache_dtype",
    "enable_lora": "enable_lora",
    "max_lora_rank": "max_rank",
    "max_loras": "max_slots",
    "max_cpu_loras": "max_cpu_loras",
    "tensor_parallel_size": "tensor_parallel_size",
}
# vLLM arguments that change nothing here, whatever their value; the reason logged is the one
# serve.py logs for its flag of the same name (jaxlora.vllm_options.OPTIONS)
VLLM_NO_EFFECT_ARGS: tuple[str, ...] = (
    "enforce_eager",
    "trust_remote_code",
    "disable_log_stats",
    "swap_space",
)


def _launch_of_vllm_args(model, engine_args: Mapping[str, Any], dtype, seed: int, tp: int):
    """The serve.py launch (``jaxlora.server.launch.LaunchConfig``) that vLLM's engine
    arguments ask for; ConfigError naming an argument this LLM does not take, or a value its
    check refuses."""
    import logging

    from jaxlora.server.launch import DTYPES, LaunchConfig
    from jaxlora.vllm_options import OPTIONS

    unknown = sorted(set(engine_args) - set(VLLM_ENGINE_ARGS) - set(VLLM_NO_EFFECT_ARGS))
    if unknown:
        raise ConfigError(
            f"LLM({unknown[0]}=...): not an argument of this LLM; expected its own "
            "(params, adapters, tokenizer, engine_config, dtype, seed, load_workers, tp, "
            "adapter_host_budget_bytes) or one of vLLM's engine arguments "
            f"{sorted(VLLM_ENGINE_ARGS) + sorted(VLLM_NO_EFFECT_ARGS)}"
        )
    reasons = {option.name: option.why for option in OPTIONS}
    for name in sorted(set(engine_args) & set(VLLM_NO_EFFECT_ARGS)):
        logging.getLogger(__name__).info(
            "LLM(%s=%r): no effect: %s", name, engine_args[name], reasons[name]
        )
    fields = {
        VLLM_ENGINE_ARGS[name]: value
        for name, value in engine_args.items()
        if name in VLLM_ENGINE_ARGS
    }
    if "tensor_parallel_size" in fields and tp != 1:
        raise ConfigError(
            f"LLM(tp={tp}, tensor_parallel_size={fields['tensor_parallel_size']}): both are "
            "the tensor-parallel size; give one"
        )
    fields.setdefault("tensor_parallel_size", tp)
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in DTYPES:
        raise ConfigError(f"dtype: {dtype_name}; expected one of {sorted(DTYPES)}")
    model_source = "" if isinstance(model, ModelConfig) else os.fspath(model)
    try:
        return LaunchConfig(model=model_source, dtype=dtype_name, seed=seed, **fields)
    except ConfigError as e:
        given = ", ".join(f"{name}={value!r}" for name, value in engine_args.items())
        raise ConfigError(f"LLM({given}): {e}") from None


def _check_dtype(dtype) -> None:
    """ConfigError unless dtype is a floating-point dtype (the model's and the pools')."""
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        raise ConfigError(
            f"dtype: {dtype!r} is not a dtype (expected e.g. jnp.float32 or 'bfloat16')"
        ) from None
    if not floating:
        raise ConfigError(
            f"dtype: {jnp.dtype(dtype).name}; expected a floating-point dtype (float32, "
            "bfloat16 or float16)"
        )


def load_base_model(
    model: str | os.PathLike | ModelConfig,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    fuse_groups: int = 0,
):
    """(config, params, tokenizer or None) from a preset name, a HF dir or an orbax checkpoint.

    fuse_groups > 0: a preset's random weights (created on the device) come fused, in that
    many groups (``init_params``); a checkpoint's are host arrays, fused on the host by
    ``fuse_projections``."""
    from configs.models import MODEL_PRESETS
    from jaxlora.model import init_params

    if isinstance(model, ModelConfig):
        return model, init_params(model, seed, dtype=dtype, fuse_groups=fuse_groups), None
    model = os.fspath(model)
    if model in MODEL_PRESETS:
        config = MODEL_PRESETS[model]
        tokenizer = tiny_tokenizer() if model == "tiny" else None
        params = init_params(config, seed, dtype=dtype, fuse_groups=fuse_groups)
        return config, params, tokenizer
    given, model = model, resolve_local(model)
    if not os.path.isdir(model):
        hub = f"; as a Hugging Face id, {not_cached(given)}" if is_repo_id(given) else ""
        raise ConfigError(
            f"model {given!r}: not a preset ({sorted(MODEL_PRESETS)}) and not a "
            f"directory (expected a HF checkpoint or an orbax checkpoint){hub}"
        )
    tokenizer = None
    if os.path.exists(os.path.join(model, "tokenizer.json")):
        tokenizer = Tokenizer.from_file(model)
    if os.path.exists(os.path.join(model, "config.json")):
        from jaxlora.formats.hf import load_hf_checkpoint

        config, params = load_hf_checkpoint(model, dtype=dtype)
    else:
        from jaxlora.formats.checkpoint import restore_params

        config, params = restore_params(model)
        # The checkpoint keeps the dtype it was saved in; serve in the one asked for.
        params = jax.tree.map(lambda p: np.asarray(p).astype(dtype), params)
    return config, params, tokenizer


class LLM:
    """One base model, any number of adapters, batched generation.

    adapters: name -> PEFT directory or LoraWeights (registered at once; more later with
    ``register_adapter``). tp: tensor-parallel size (Megatron split over the first tp devices).
    adapter_host_budget_bytes: the most bytes of disk-backed adapters' weights kept in host RAM
    (least recently used dropped back to disk; None: no limit; ``AdapterStoreConfig``).
    tokenizer: a ``Tokenizer``, or (vLLM's) a directory or Hub id in the local cache to read
    one from. vLLM's engine arguments (``VLLM_ENGINE_ARGS``: max_model_len, max_num_seqs,
    max_num_batched_tokens, gpu_memory_utilization, kv_cache_memory_bytes,
    enable_prefix_caching, block_size, kv_cache_dtype, enable_lora, max_lora_rank, max_loras,
    max_cpu_loras, tensor_parallel_size) size the engine as serve.py's same flags do, in place
    of ``engine_config``; enforce_eager, trust_remote_code, disable_log_stats and swap_space
    are taken and change nothing; any other argument is refused naming it.
    """

    def __init__(
        self,
        model: str | os.PathLike | ModelConfig = "tiny",
        *,
        params=None,
        adapters: Mapping[str, str | os.PathLike | LoraWeights] | None = None,
        tokenizer: Tokenizer | None = None,
        engine_config: EngineConfig | None = None,
        dtype=jnp.float32,
        seed: int = 0,
        load_workers: int = 2,
        tp: int = 1,
        adapter_host_budget_bytes: int | None = None,
        **engine_args,
    ):
        if not isinstance(model, (str, os.PathLike, ModelConfig)):
            raise ConfigError(
                "model: expected a preset name, a checkpoint directory or a ModelConfig, got "
                f"{type(model).__name__}"
            )
        if adapters is not None and not isinstance(adapters, Mapping):
            raise ConfigError(
                "adapters: expected a mapping of adapter names to PEFT directories or "
                f"LoraWeights, got {type(adapters).__name__}"
            )
        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise ConfigError(
                "engine_config: expected an EngineConfig or None, got "
                f"{type(engine_config).__name__}"
            )
        _check_dtype(dtype)
        for name, value in (("tp", tp), ("seed", seed)):
            if not is_int(value) or (name == "tp" and value < 1):
                raise ConfigError(
                    f"{name}: expected an int{' >= 1' if name == 'tp' else ''}, got {value!r}"
                )
        seed = int(seed)  # (a numpy int too: init_params reads only an int as a seed)
        launch = None
        if engine_args:
            if engine_config is not None:
                raise ConfigError(
                    f"engine_config: given beside vLLM's engine arguments {sorted(engine_args)}, "
                    "which size the engine too; expected one of the two"
                )
            launch = _launch_of_vllm_args(model, engine_args, dtype, seed, tp)
            tp = launch.tensor_parallel_size
            if not launch.enable_lora and adapters:
                raise ConfigError(
                    f"adapters: {sorted(adapters)} given with enable_lora=False (the base "
                    "model alone); expected no adapters, or enable_lora=True"
                )
            if launch.gpu_memory_utilization is not None:
                from jaxlora.server.device_memory import reserve_device_memory

                reserve_device_memory(launch.gpu_memory_utilization)
        self.engine_config = engine_config or EngineConfig()
        # The model's generation_config.json sampling defaults (vLLM's LLM reads them too).
        self.generation_defaults: dict[str, float | int] = {}
        if params is None:
            # Fused as they are made or loaded (one group a tensor-parallel device), before the
            # adapter pools and the KV cache: the engine would fuse them too, but with this
            # frame holding the separate kernels of a preset's device-resident weights, and
            # device-side fusion leaves a hole below the fused kernels that the KV pools
            # cannot use (jaxlora.server.launch.build_state loads its own likewise).
            groups = tp if self.engine_config.runner.fuse_projections else 0
            if not isinstance(model, ModelConfig):
                model = resolve_local(model)  # a Hub id: its snapshot in the local cache
            self.config, params, default_tokenizer = load_base_model(
                model, seed=seed, dtype=dtype, fuse_groups=groups
            )
            if not isinstance(model, ModelConfig) and os.path.isdir(model):
                from jaxlora.formats.hf import read_generation_defaults

                self.generation_defaults = read_generation_defaults(model)
            if groups:
                from jaxlora.model import fuse_projections

                params = fuse_projections(params, groups=groups)  # a checkpoint's, on the host
        else:
            if not isinstance(model, ModelConfig):
                raise ConfigError(
                    "LLM(model=..., params=...): with params, model must be a ModelConfig"
                )
            check_params(model, params)  # (before tp > 1 shards them: the Engine checks too)
            self.config, default_tokenizer = model, None
        if isinstance(tokenizer, (str, os.PathLike)):  # (vLLM's: a directory or a Hub id)
            from jaxlora.server.launch import tokenizer_for

            tokenizer = tokenizer_for(os.fspath(tokenizer), self.config)
        self.tokenizer = tokenizer or default_tokenizer
        if launch is not None:
            # vLLM's arguments: the engine sized as serve.py sizes it (KV pages by
            # gpu_memory_utilization from what the weights leave, ...)
            from jaxlora.server.device_memory import host_bytes_per_device
            from jaxlora.server.launch import adapter_host_budget, engine_config_for

            pending = 0
            if launch.gpu_memory_utilization is not None:
                pending = host_bytes_per_device(params, launch.tensor_parallel_size)
            self.engine_config = engine_config_for(
                self.config, launch, warmup=EngineConfig().warmup, pending_bytes=pending
            )
            if adapter_host_budget_bytes is None:
                adapter_host_budget_bytes = adapter_host_budget(
                    launch, self.config, self.engine_config
                )
        kv = self.engine_config.kv
        if (
            engine_config is None
            and launch is None
            and kv.max_model_len > self.config.context_length
        ):
            # The default context, cut to what the model is made for (a checkpoint of fewer
            # positions, e.g. the test fixtures' 128).
            kv = dataclasses.replace(kv, max_model_len=self.config.context_length)
            self.engine_config = dataclasses.replace(self.engine_config, kv=kv)
        pool: LoraPoolConfig = self.engine_config.lora_pool
        mesh, pool_shardings = None, None
        if tp > 1:
            from jaxlora import sharding

            mesh = sharding.make_mesh(tp)
            params = sharding.shard_params(params, self.config, mesh)
            pool_shardings = sharding.pool_shardings(mesh)
        self.store = AdapterStore(
            self.config,
            pool,
            AdapterStoreConfig(
                dtype=jnp.dtype(dtype).name, host_budget_bytes=adapter_host_budget_bytes
            ),
        )
        self.adapters = AdapterManager(
            self.store, AdapterManagerConfig(load_workers=load_workers), shardings=pool_shardings
        )
        for name, source in (adapters or {}).items():
            self.adapters.register(name, source)
        self.engine = Engine(
            self.config,
            params,
            self.engine_config,
            adapters=self.adapters,
            tokenizer=self.tokenizer,
            dtype=dtype,
            mesh=mesh,
        )

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        """An LLM over an Engine built elsewhere, with its model, adapter manager and tokenizer
        (no generation_config.json defaults), e.g. to serve an engine of one's own pipeline
        over HTTP: ``create_app(ServingState(LLM.from_engine(engine), ServerConfig(...)))``."""
        if not isinstance(engine, Engine):
            raise ConfigError(f"from_engine: expected an Engine, got {type(engine).__name__}")
        if engine.adapters is None:
            raise ConfigError(
                "from_engine: the engine has no adapter manager (Engine(adapters=...)); an LLM "
                "serves adapters through one"
            )
        llm = cls.__new__(cls)
        llm.engine = engine
        llm.engine_config = engine.engine_config
        llm.config = engine.config
        llm.tokenizer = engine.tokenizer
        llm.adapters = engine.adapters
        llm.store = engine.adapters.store
        llm.generation_defaults = {}
        return llm

    @property
    def params(self):
        return self.engine.runner.params

    def register_adapter(self, name: str, source: str | os.PathLike | LoraWeights):
        return self.adapters.register(name, source)

    def merge_adapters(self, name: str, parts: Sequence[tuple[str, float]]):
        """Registers as ``name`` the weighted sum of registered adapters' updates, exactly
        (PEFT's ``add_weighted_adapter(combination_type="cat")``: its rank per module is the
        sum of the parts'; ``AdapterStore.merged_weights``)."""
        return self.adapters.register(name, self.adapters.store.merged_weights(name, parts))

    def reset_prefix_cache(self) -> int:
        """Forgets the cached prompt prefixes (vLLM's ``LLM.reset_prefix_cache``; e.g. between
        benchmark passes); the number of KV pages that were registered."""
        return self.engine.reset_prefix_cache()

    def encode(self, prompt: str | Sequence[int] | Mapping[str, Any]) -> list[int]:
        """A prompt's token ids: text (tokenized), token ids, or vLLM's ``{"prompt": text}`` /
        ``{"prompt_token_ids": ids}``."""
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if isinstance(prompt, str):  # (else tokenized as text: another prompt)
                    raise RequestError(
                        f"prompt_token_ids: expected a list of token ids, got text {prompt!r:.100}"
                    )
            elif "prompt" in prompt and isinstance(prompt["prompt"], str):
                prompt = prompt["prompt"]
            else:
                raise RequestError(
                    "prompt: a dict prompt takes 'prompt' (text) or 'prompt_token_ids', got "
                    f"keys {sorted(map(str, prompt))}"
                )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    "prompt: text given but the model has no tokenizer; pass token ids"
                )
            return self.tokenizer.encode(prompt)
        return checked_token_ids(prompt, "prompt: expected text or a list of token ids (ints)")

    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        deadline_s: float | None = None,
        stream: bool = True,
    ) -> Request:
        """Queues one request and returns it without waiting. With the engine thread running
        (``start()``) it is served in the background (``Request.wait``, ``stream``); without,
        nothing steps it until the caller does (``llm.engine.run_until_idle()``): a
        ``wait()`` with no timeout would wait for ever."""
        return self.engine.submit(
            self.encode(prompt),
            sampling if sampling is not None else self.get_default_sampling_params(),
            adapter=adapter,
            deadline_s=deadline_s,
            stream=stream,
        )

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without sampling parameters gets (vLLM's): SamplingParams' defaults
        with the model's generation_config.json values (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens as max_tokens) over them."""
        return SamplingParams(**self.generation_defaults)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int] | Mapping[str, Any]],
        adapter: str | None | Sequence[str | None] = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | None | Sequence[LoRARequest | None] = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Runs every prompt in shared batches (each with its own adapter) until all finish.

        prompts: one prompt or a list of them, each text, token ids or vLLM's
        ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``; one Completion a prompt, with
        ``SamplingParams.n`` samples in its ``outputs`` (vLLM's ``RequestOutput.outputs``).
        sampling may come second, as in vLLM's ``generate(prompts, sampling_params)``, and
        vLLM's keyword names are taken: ``sampling_params`` for ``sampling``, ``lora_request``
        (a ``LoRARequest`` or one a prompt, None: the base model) for ``adapter``, and
        ``use_tqdm`` (vLLM's progress bar on stderr, off by default here), and ``priority``
        (vLLM's: one int a prompt, lower served first, under
        ``EngineConfig(scheduling_policy="priority")``). If a
        prompt is refused (too long, an unknown adapter, ...), or the call is interrupted,
        none of its requests is left in the engine.
        Repeats of one prompt with one adapter (samples of a prompt: best-of-n, RL rollouts)
        compute the prompt's full pages once (``Engine.submit(share_prompt_with=...)``)."""
        prompts = _prompt_list(prompts)
        n = len(prompts)
        tqdm = _tqdm(use_tqdm)
        if sampling is None and (
            isinstance(adapter, SamplingParams)
            or (
                isinstance(adapter, (list, tuple))
                and adapter
                and all(isinstance(a, SamplingParams) for a in adapter)
            )
        ):
            # vLLM's order, generate(prompts, sampling_params): a SamplingParams is no adapter.
            adapter, sampling = None, adapter
        if sampling_params is not None:
            if sampling is not None:
                raise RequestError(
                    "sampling_params: given beside sampling (vLLM's name for it); give one"
                )
            sampling = sampling_params
        if lora_request is not None:
            if adapter is not None:
                raise RequestError(
                    "lora_request: given beside adapter (vLLM's way to name one); give one"
                )
            adapter = self._lora_request_adapters(lora_request)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(adapters) != n or len(samplings) != n:
            raise RequestError(
                f"generate: {n} prompts but {len(adapters)} adapters and "
                f"{len(samplings)} sampling parameters"
            )
        if priority is None:
            priorities = [0] * n
        elif not isinstance(priority, (list, tuple)) or len(priority) != n:
            raise RequestError(
                f"priority: expected a list of {n} ints (one a prompt, as vLLM's), got "
                f"{priority!r:.100}"
            )
        else:
            # (numpy ints too; Engine.submit refuses a priority its policy does not read, and
            # the requests queued before it are then abandoned, as for any refused prompt)
            priorities = list(priority)
            for p in priorities:
                if not is_int(p):
                    raise RequestError(f"priority: expected ints, got {p!r:.100}")
        for a, s in zip(adapters, samplings, strict=True):
            check_adapter_and_sampling(a, s)  # (all before any is queued)
        samplings = [s if s is not None else self.get_default_sampling_params() for s in samplings]
        prompt_ids = [self.encode(p) for p in prompts]
        requests, per_prompt, leaders = [], [], {}
        try:
            for ids, a, s, p in zip(prompt_ids, adapters, samplings, priorities, strict=True):
                key = (tuple(ids), a, s.truncate_prompt_tokens)
                samples = []
                for sample in _samples(s):
                    request = self.engine.submit(
                        ids,
                        sample,
                        adapter=a,
                        stream=False,
                        share_prompt_with=leaders.get(key),
                        priority=int(p),
                    )
                    leaders.setdefault(key, request)
                    samples.append(request)
                requests.extend(samples)
                per_prompt.append(samples)
        except BaseException:
            # (a later prompt refused: the ones queued before it are not left to run)
            self._abandon(requests, reap=True)
            raise
        progress = None if tqdm is None else _Progress(tqdm, per_prompt)
        try:
            if self.engine._thread is None and progress is None:
                self.engine.run_until_idle()
            elif self.engine._thread is None:
                while self.engine.has_work():  # (a step at a time: the bar moves as they end)
                    self.engine.run_until_idle(max_steps=1)
                    progress.update()
            for r in requests:
                while not r.wait(timeout=0.1):
                    if self.engine._thread is None:
                        # The engine thread was stopped (llm.stop()) while this call waited
                        # on it: nothing else steps these requests now.
                        self.engine.run_until_idle()
                    if progress is not None:
                        progress.update()
            if progress is not None:
                progress.update()
        except BaseException:  # (e.g. KeyboardInterrupt: the rest is not computed later)
            self._abandon(requests)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [
            _completion(samples, _prompt_text(prompt))
            for samples, prompt in zip(per_prompt, prompts, strict=True)
        ]

    def _lora_request_adapters(self, lora_request) -> str | None | list[str | None]:
        """The adapter names of vLLM's ``lora_request`` argument (one or one a prompt), each
        registered from its ``lora_path`` if its name is not yet (before any request is
        queued). A name registered from another directory is refused, not silently served."""
        many = isinstance(lora_request, (list, tuple))
        names = []
        for item in lora_request if many else [lora_request]:
            if item is None:
                names.append(None)
                continue
            name, path = getattr(item, "lora_name", None), getattr(item, "lora_path", "")
            if not isinstance(name, str) or not name or not isinstance(path, (str, os.PathLike)):
                raise RequestError(
                    "lora_request: expected a LoRARequest(lora_name, lora_int_id, lora_path) "
                    f"or None, got {item!r:.100}"
                )
            if self.adapters is None:
                raise RequestError(
                    f"lora_request {name!r}: this LLM serves its base model alone (no adapters)"
                )
            path = os.fspath(path)
            entry = self.adapters.store.current(name)
            if entry is None and not path:
                raise UnknownAdapterError(
                    f"lora_request {name!r}: no adapter is registered under this name, and its "
                    "lora_path is empty (expected the PEFT directory to load it from)"
                )
            if entry is None:
                self.register_adapter(name, path)
            elif path and os.path.realpath(path) != os.path.realpath(entry.source):
                raise RequestError(
                    f"lora_request {name!r}: lora_path {path!r}, but {name!r} is registered "
                    f"from {entry.source!r}; expected the same directory (or another name)"
                )
            names.append(name)
        return names if many else names[0]

    def _abandon(self, requests: Sequence[Request], *, reap: bool = False) -> None:
        """Cancels the unfinished requests of a generate that raised. reap: without the engine
        thread, one step finishes them now (their pages freed, the queue empty again)."""
        for r in requests:
            if not r.finished:
                self.engine.cancel(r.request_id)
        if reap and requests and self.engine._thread is None:
            self.engine.step()

    def chat(
        self,
        conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        adapter: str | None | Sequence[str | None] = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | None | Sequence[LoRARequest | None] = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
    ) -> list[Completion]:
        """``generate`` over chats (vLLM's ``LLM.chat``): one conversation (a list of
        ``{"role", "content"}`` messages) or a list of them, each rendered with the tokenizer's
        chat template (``Tokenizer.encode_chat``: ``continue_final_message`` continues the
        last message, ``chat_template_kwargs`` go to the template, ``chat_template``: a jinja2
        template in place of the tokenizer's, as vLLM's); ``sampling_params``,
        ``lora_request`` and ``use_tqdm`` as ``generate`` takes them."""
        if self.tokenizer is None:
            raise RequestError("messages: the model has no tokenizer (and so no chat template)")
        if not isinstance(conversations, Sequence) or isinstance(conversations, str):
            raise RequestError(
                "conversations: expected a list of messages or a list of such lists, got "
                f"{type(conversations).__name__}"
            )
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise RequestError(
                "chat_template_kwargs: expected a dict or None, got "
                f"{type(chat_template_kwargs).__name__}"
            )
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        prompts = [
            self.tokenizer.encode_chat(
                list(messages),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                template_kwargs=chat_template_kwargs,
                template=chat_template,
            )
            for messages in conversations
        ]
        return self.generate(
            prompts,
            adapter,
            sampling,
            sampling_params=sampling_params,
            lora_request=lora_request,
            use_tqdm=use_tqdm,
        )

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        deadline_s: float | None = None,
    ):
        """Async iterator of deltas; the engine must be running (``start()``). Leaving the
        iteration early cancels the request (its pages are freed)."""
        if self.engine._thread is None:  # (nothing would step it: the iteration would hang)
            raise RequestError("stream: the engine is not running; call llm.start() first")
        request = self.submit(prompt, adapter=adapter, sampling=sampling, deadline_s=deadline_s)
        try:
            async for delta in request.astream():
                yield delta
        finally:
            if not request.finished:
                self.engine.cancel(request.request_id)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

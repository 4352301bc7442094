"""vLLM ``serve`` options that change nothing here, or that ask for what this server does not
do, so that a vLLM command line carries over: each is taken under its vLLM name
(``--enforce-eager``, ``--swap-space 4``, ...) and either accepted, with a log line that says
why it has no effect, or
refused at launch (``ConfigError`` naming the option, the value and what it takes) where its
value asks for something this server cannot give (``--quantization fp8``,
``--pipeline-parallel-size 2``). ``define_flags`` defines the flags (absl); the options
this server implements (``--max-cpu-loras``, ``--root-path``, ``--disable-fastapi-docs``,
...) are ordinary flags of ``jaxlora.launch_flags`` and ``scripts/serve.py``.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from jaxlora.errors import ConfigError

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class VllmOption:
    """One vLLM option: ``kind`` the absl type ("bool", "int", "float", "string"),
    ``accepted`` the values that change nothing here (None: every value), ``why`` what this
    server does instead (the log line, or the refusal's reason). Its flag's default is None
    (not given)."""

    name: str
    kind: str
    accepted: tuple | None
    why: str
    # Also accepted: the value of this flag of ours (e.g. --lora-dtype equal to --dtype).
    same_as: str | None = None


OPTIONS = (
    VllmOption(
        "enforce_eager",
        "bool",
        None,
        "steps run as XLA-compiled programs; there is no CUDA-graph capture to turn off",
    ),
    VllmOption(
        "trust_remote_code",
        "bool",
        None,
        "no code from a checkpoint runs here (the model families are jaxlora's own)",
    ),
    VllmOption(
        "disable_log_stats",
        "bool",
        None,
        "this server logs no periodic statistics (GET /metrics has them)",
    ),
    VllmOption(
        "swap_space",
        "float",
        None,
        "a preempted request recomputes its KV cache; nothing is swapped to host memory",
    ),
    VllmOption(
        "enable_chunked_prefill",
        "bool",
        None,
        "prompts are always prefilled in chunks of --prefill_chunk tokens beside the decode rows",
    ),
    VllmOption(
        "disable_frontend_multiprocessing",
        "bool",
        None,
        "the HTTP server and the engine share one process",
    ),
    VllmOption(
        "enable_request_id_headers",
        "bool",
        None,
        "every answer carries its X-Request-Id header",
    ),
    VllmOption(
        "max_seq_len_to_capture",
        "int",
        None,
        "no CUDA graphs are captured (XLA compiles each step shape)",
    ),
    VllmOption(
        "distributed_executor_backend",
        "string",
        None,
        "one process drives every device (--tensor_parallel_size)",
    ),
    VllmOption(
        "download_dir",
        "string",
        None,
        "nothing is downloaded: --model is a local checkpoint, a preset or a Hub id already in "
        "the local cache",
    ),
    VllmOption(
        "fully_sharded_loras",
        "bool",
        None,
        "adapter pools are sharded as the model is (--tensor_parallel_size)",
    ),
    VllmOption(
        "guided_decoding_backend",
        "string",
        None,
        "structured outputs are decoded under llguidance's token masks, whatever backend is named",
    ),
    VllmOption(
        "lora_extra_vocab_size",
        "int",
        None,
        "adapters add no vocabulary here (one whose checkpoint carries new token embeddings is "
        "refused when loaded)",
    ),
    VllmOption(
        "num_scheduler_steps",
        "int",
        (1,),
        "one decode step an engine iteration; async scheduling overlaps the host's work instead",
    ),
    VllmOption(
        "pipeline_parallel_size",
        "int",
        (1,),
        "no pipeline parallelism; --tensor_parallel_size splits the model over devices",
    ),
    VllmOption(
        "data_parallel_size",
        "int",
        (1,),
        "one engine a process; run one server a device group behind a load balancer",
    ),
    VllmOption("api_server_count", "int", (1,), "one HTTP server process drives the engine"),
    VllmOption("cpu_offload_gb", "float", (0.0,), "weights stay on the devices"),
    VllmOption(
        "quantization",
        "string",
        ("", "none", "None"),
        "weights are served in --dtype (no quantized formats; --kv_cache_dtype fp8 quantizes "
        "the KV cache)",
    ),
    VllmOption(
        "lora_dtype",
        "string",
        ("auto",),
        "adapters are served in the model's --dtype",
        same_as="dtype",
    ),
    VllmOption(
        "load_format",
        "string",
        ("auto", "safetensors"),
        "checkpoints are read from safetensors files",
    ),
    VllmOption(
        "tokenizer_mode",
        "string",
        ("auto", "hf"),
        "the checkpoint's Hugging Face tokenizer is used",
    ),
    VllmOption(
        "revision",
        "string",
        ("", "main"),
        "nothing is downloaded: the local files of --model are served as they are",
    ),
    VllmOption(
        "chat_template_content_format",
        "string",
        ("auto",),
        "message contents reach the chat template as text (parts joined) or as the parts list, "
        "as the template reads them",
    ),
    VllmOption(
        "long_lora_scaling_factors",
        "string",
        ("",),
        "adapters with their own long-context RoPE scaling are not supported",
    ),
    VllmOption("otlp_traces_endpoint", "string", ("",), "no OpenTelemetry tracing"),
    VllmOption(
        "hf_overrides",
        "string",
        ("", "{}"),
        "the checkpoint's config.json is read as it is",
    ),
    VllmOption(
        "override_generation_config",
        "string",
        ("", "{}"),
        "request defaults come from --generation_config",
    ),
    VllmOption(
        "limit_mm_per_prompt", "string", ("",), "text models only (no image or audio input)"
    ),
    VllmOption("allowed_local_media_path", "string", ("",), "text models only (no media input)"),
    VllmOption("middleware", "string", ("",), "no user middleware is loaded"),
)

_DEFINE = {
    "bool": flags.DEFINE_bool,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "string": flags.DEFINE_string,
}


def define_flags() -> None:
    """Defines each option's absl flag (default None: not given), unless a flag of its name is
    defined already (``jaxlora.launch_flags`` calls this after its own flags). Importing the
    module alone defines nothing: the library reads ``OPTIONS`` too."""
    for option in OPTIONS:
        if option.name not in FLAGS:
            help_text = f"vLLM's option, taken so that its command lines carry over: {option.why}"
            if option.accepted is not None:
                help_text += f" (takes {list(option.accepted)})"
            _DEFINE[option.kind](option.name, None, help_text)


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_vllm_options() -> list[str]:
    """The notes to log for the vLLM options given (one a line: the option and why it changes
    nothing here); ConfigError naming the first whose value asks for what this server does not
    do."""
    notes = []
    for option in OPTIONS:
        value = FLAGS[option.name].value
        if value is None:
            continue
        same = option.same_as is not None and value == FLAGS[option.same_as].value
        if option.accepted is not None and value not in option.accepted and not same:
            accepted = " or ".join(repr(v) for v in option.accepted if v != "")
            if option.same_as is not None:
                accepted += f" or --{option.same_as}'s {FLAGS[option.same_as].value!r}"
            raise ConfigError(
                f"{_dashed(option.name)} {value!r}: not supported here ({option.why}); "
                f"expected {accepted or 'it unset'}"
            )
        notes.append(f"{_dashed(option.name)}={value!r} changes nothing here: {option.why}")
    return notes

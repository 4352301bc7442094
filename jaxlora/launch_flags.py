"""The flags of a serving process, shared by ``scripts/serve.py`` and ``scripts/run_batch.py``:
the model, its adapters, the engine's sizes and kernels, the server's options. Importing this
module defines them (absl); ``launch_config()`` reads them into a ``LaunchConfig``.
"""

from __future__ import annotations

import logging
import os
import re

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "model",
    "",
    "Preset name (tiny, llama-2-7b, qwen3-8b, ...), HF checkpoint directory (Llama, Mistral, "
    "Qwen2, Qwen3, Phi-3, Gemma 1 / 2 / 3 text) or orbax checkpoint; empty: the embedded demo "
    "model and adapters. Also taken as the first positional argument (vLLM's `vllm serve "
    "MODEL`).",
)
flags.DEFINE_string("served_model_name", "", "Name clients use for the base model.")
flags.DEFINE_list(
    "lora_modules",
    [],
    "Adapters to serve: name=path or path (named after its directory), comma separated; "
    "vLLM's form is taken too: space-separated items after --lora-modules, each name=path "
    'or a JSON object {"name": ..., "path": ...}.',
)
flags.DEFINE_list(
    "lora_dirs", [], "Directories whose every sub-directory is a PEFT adapter (named after it)."
)
flags.DEFINE_list(
    "pinned_adapters",
    [],
    "Adapters kept resident in the GPU pool from the start, never evicted (no cold loads).",
)
flags.DEFINE_bool(
    "enable_lora",
    True,
    "Serve LoRA adapters (vLLM's --enable-lora; on by default here). --noenable_lora serves the "
    "base model alone: no adapter flag may be given, and the adapter pools take one page each, "
    "leaving their device memory to the KV cache.",
)
flags.DEFINE_list(
    "allowed_adapter_roots",
    [],
    "Directories runtime loading may read adapters from; empty: runtime loading is refused.",
)
flags.DEFINE_list(
    "allowed_origins",
    [],
    "Web origins (https://app.example.com, or *) whose pages may call the server from a "
    "browser (CORS); empty: none.",
)
flags.DEFINE_bool(
    "allow_credentials",
    False,
    "CORS: browsers may send cookies and HTTP authentication with --allowed_origins' calls "
    "(vLLM's --allow-credentials).",
)
flags.DEFINE_list(
    "allowed_methods", ["*"], "CORS: HTTP methods those pages may use (vLLM's; *: any)."
)
flags.DEFINE_list(
    "allowed_headers", ["*"], "CORS: request headers those pages may send (vLLM's; *: any)."
)
flags.DEFINE_string(
    "response_role",
    "assistant",
    "The role chat answers come from where the prompt asks for a new message "
    "(add_generation_prompt; else the last message's role, whose message it continues; vLLM's "
    "--response-role).",
)
flags.DEFINE_integer(
    "max_logprobs",
    20,
    "The most logprobs a token a request may ask for (top_logprobs, logprobs, prompt_logprobs; "
    "vLLM's --max-logprobs), at most 20.",
    lower_bound=0,
    upper_bound=20,
)
flags.DEFINE_bool(
    "disable_fastapi_docs",
    False,
    "Serve no OpenAPI schema or pages (/docs, /redoc, /openapi.json; vLLM's option).",
)
flags.DEFINE_bool(
    "return_tokens_as_token_ids",
    False,
    "Logprobs name tokens 'token_id:<id>' in every answer, as a request's own "
    "return_tokens_as_token_ids asks (vLLM's --return-tokens-as-token-ids).",
)
flags.DEFINE_bool(
    "enable_prompt_tokens_details",
    False,
    "Answers' usage counts the prompt tokens the prefix cache (or a request of the same prompt) "
    "had already computed: prompt_tokens_details.cached_tokens (vLLM's "
    "--enable-prompt-tokens-details; off: null). The Responses API's "
    "input_tokens_details.cached_tokens counts them either way.",
)
flags.DEFINE_bool(
    "log_requests",
    False,
    "Log one line a finished request: id, model, token counts, finish reason, time to first "
    "token, end to end, preemptions.",
)
flags.DEFINE_bool(
    "disable_log_requests",
    False,
    "vLLM's older switch for no per-request log lines, which is this server's default; given "
    "with --log_requests (--enable_log_requests) it is refused as a contradiction.",
)
flags.DEFINE_enum(
    "tool_call_parser",
    "",
    ["", "hermes", "llama3_json", "mistral", "pythonic"],
    "How chat answers' tool calls are read back when a request offers tools (the model's "
    "format: <tool_call>{...}</tool_call> blocks, Llama 3's JSON, Mistral's [TOOL_CALLS], or "
    "Llama 3.2/4's Python list of calls); empty: requests with tools are refused unless "
    "tool_choice is 'none'.",
)
flags.DEFINE_bool(
    "enable_auto_tool_choice",
    None,
    "Chats with tools and tool_choice 'auto' (or none given) may call them, read back by "
    "--tool_call_parser (vLLM's --enable-auto-tool-choice, which needs the parser too); unset: "
    "on where --tool_call_parser is given; false: such chats are refused ('none', 'required' "
    "and a named function still work).",
)
flags.DEFINE_enum(
    "reasoning_parser",
    "",
    ["", "deepseek_r1", "qwen3"],
    "How chat answers' reasoning is read apart from their content (the message's "
    "reasoning_content): up to </think> (deepseek_r1), or a <think>...</think> block opening the "
    "answer (qwen3); empty: the answer is all content.",
)
flags.DEFINE_bool(
    "enable_prefix_caching",
    False,
    "Requests share the KV pages of a common prompt prefix of the same adapter (vLLM's "
    "automatic prefix caching; KVCacheConfig.prefix_caching).",
)
flags.DEFINE_bool(
    "load_adapters_on_demand",
    False,
    "A request naming no registered adapter loads the adapter directory of that name under "
    "--allowed_adapter_roots first (LoRAX-style; new adapters need no load call).",
)
flags.DEFINE_integer(
    "stream_interval",
    1,
    "Tokens a streamed chunk carries at least: n > 1 holds a stream's tokens until n are made "
    "(its first token and its end go out at once), n times fewer chunks for the server to "
    "send, which near capacity leaves more of the interpreter to the engine; 1: every token "
    "as it is made.",
    lower_bound=1,
)
flags.DEFINE_float(
    "switch_interval_ms",
    0.0,
    "The interpreter's thread switch interval while serving, in ms (sys.setswitchinterval): "
    "the engine's host work and the HTTP handlers share one interpreter lock, and the engine "
    "waits up to this long for it after each step it hands to the device; 0: Python's own "
    "(5 ms).",
    lower_bound=0.0,
    upper_bound=1000.0,
)
flags.DEFINE_integer(
    "max_request_merges",
    8,
    "LoRAX requests' merged_adapters kept as adapters at most (each distinct merge computed "
    "once; past this many the least recently requested that no request uses is unloaded); "
    "0: refused.",
    lower_bound=0,
)
flags.DEFINE_string(
    "api_key",
    None,
    "Require 'Authorization: Bearer KEY' on /v1/* (default: $JAXLORA_API_KEY; empty: no key).",
)
flags.DEFINE_string(
    "tokenizer",
    "",
    "The tokenizer's directory (tokenizer.json) or a Hub id in the local cache, in place of "
    "the model's own (vLLM's --tokenizer); empty: the model's.",
)
flags.DEFINE_string(
    "chat_template",
    "",
    "A jinja2 chat template for the base model, or a file holding one, in place of its "
    "tokenizer's (vLLM's --chat-template); checked at start-up.",
)
flags.DEFINE_bool(
    "trust_request_chat_template",
    False,
    "Render a chat request's own chat_template (vLLM's --trust-request-chat-template; jinja2 "
    "in a sandbox, but it may loop as long as it likes): only for trusted clients.",
)
flags.DEFINE_string(
    "generation_config",
    "auto",
    "Sampling defaults for requests that leave a field unset (vLLM's --generation-config): "
    "auto = the model directory's generation_config.json (temperature, top_p, top_k, min_p, "
    "repetition_penalty, max_new_tokens), none = OpenAI's defaults, or a directory or file "
    "holding one.",
)
flags.DEFINE_integer("max_batch", None, "Decode rows per step (default: 8 on CPU, 32 on GPU).")
flags.DEFINE_integer("max_prefill_rows", None, "Prompts prefilled together in one step.")
flags.DEFINE_integer("prefill_chunk", None, "Prompt tokens one prefill step feeds per prompt.")
flags.DEFINE_integer(
    "prefill_key_block",
    None,
    "Prefill steps whose page tables hold more key positions than this (max_model_len) attend "
    "block by block over blocks of this many, only as far as the batch's longest prompt "
    "(default 4096; 0: always one pass over the whole table).",
)
flags.DEFINE_list(
    "prefill_context_buckets",
    None,
    "Contexts (key positions) a prefill step's page table is cut to: the narrowest that holds "
    "the step's longest prompt, so that a short prompt's attention does not read max_model_len "
    "keys; each is one more compiled prefill shape (default 512,2048,4096, then doubling to "
    "65536; empty: none; RunnerConfig.prefill_context_buckets).",
)
flags.DEFINE_integer("max_num_tokens", None, "Token budget of one engine step.")
flags.DEFINE_integer("max_waiting", None, "Queue bound: beyond it requests get 503.")
flags.DEFINE_integer("kv_pages", None, "KV cache pages (default: half the batch at full context).")
flags.DEFINE_string(
    "kv_cache_memory",
    None,
    "The KV cache's memory on each device, instead of --kv_pages (vLLM's "
    "--kv-cache-memory-bytes): bytes, or a number with a unit, e.g. 20GiB, 16GB, 512MiB; the "
    "page count is what fits at --kv_cache_dtype's bytes.",
)
flags.DEFINE_float(
    "gpu_memory_utilization",
    None,
    "The share of each GPU's memory the server may fill (vLLM's --gpu-memory-utilization, "
    "e.g. 0.9): weights, adapter pools and a step's working memory first, then as many KV "
    "pages as fit; instead of --kv_pages and --kv_cache_memory. Sets "
    "XLA_PYTHON_CLIENT_MEM_FRACTION to it unless that is set.",
)
flags.DEFINE_integer("page_size", None, "Tokens per KV page.")
flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    # (jaxlora.engine.kv_cache.KV_CACHE_DTYPES' names, spelled out: flags load before jax)
    ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
    "The KV cache's dtype (vLLM's --kv-cache-dtype): auto = the model's (--dtype); fp8 (= "
    "fp8_e4m3) or fp8_e5m2 store K/V in 8 bits, scale 1.0, saturating at +-448 / +-57344: half "
    "the memory of bf16 K/V a page, outputs no longer bit-identical (KVCacheConfig.cache_dtype).",
)
flags.DEFINE_integer("max_model_len", None, "Context length (prompt + output).")
flags.DEFINE_integer("adapter_pool_pages", None, "Pages of each adapter page pool.")
flags.DEFINE_list(
    "adapter_pool_axis_pages",
    [],
    "Pages of named adapter pools where they differ from --adapter_pool_pages, as pool=pages "
    "(pools: embed, heads, kv_heads, mlp; LoraPoolConfig.axis_pages), e.g. mlp=16 when adapters "
    "target the attention projections only: an all-module adapter takes embed, heads, kv_heads "
    "and mlp pages 7:2:2:3, a q_proj + v_proj one 2:1:1:0.",
)
flags.DEFINE_string(
    "adapter_host_memory",
    None,
    "The most host RAM the weights of adapters read from disk may hold, e.g. 64GiB (vLLM's "
    "--max-cpu-loras, in bytes): past it the least recently used are dropped and read again "
    "from disk when next needed (default: no limit).",
)
flags.DEFINE_integer(
    "max_cpu_loras",
    None,
    "vLLM's --max-cpu-loras: host RAM for this many disk-read adapters of --max_rank on every "
    "module, in --dtype (the --adapter_host_memory budget, counted in adapters).",
)
flags.DEFINE_integer("rows_per_page", None, "Rank-rows per adapter page.")
flags.DEFINE_integer("max_rank", None, "Largest adapter rank accepted.")
flags.DEFINE_integer("max_slots", None, "Distinct adapters one step may use.")
flags.DEFINE_bool(
    "deterministic",
    True,
    "The same bits on every run: no atomic adds in a step; the LoRA shrink's split reduction "
    "is summed in one fixed order (RunnerConfig.deterministic). --nodeterministic: atomic adds.",
)
flags.DEFINE_enum(
    "kv_write",
    "pallas",
    ["xla", "pallas"],
    "Who rotates q, k (RoPE) and writes each step's K/V into the paged cache: one Pallas launch "
    "a layer, or XLA's fusions and scatters (RunnerConfig.kv_write).",
)
flags.DEFINE_enum(
    "prefill_attention",
    "auto",
    ["auto", "xla", "cudnn"],
    "The prefill chunks' one-pass attention: XLA's (scores materialized) or cuDNN's fused "
    "attention, bf16 / fp16 on a GPU; auto: cuDNN's there for heads of at most 128, XLA's for "
    "wider ones (Gemma's 256), where cuDNN's was slower (RunnerConfig.prefill_attention).",
)
flags.DEFINE_enum(
    "residual_norm",
    "pallas",
    ["xla", "pallas"],
    "Who adds o's and down's outputs into the residual stream and runs the RMSNorms after them "
    "in decode steps where lora_matmul runs every projection: XLA's fusions, or two Pallas "
    "launches a layer (RunnerConfig.residual_norm).",
)
flags.DEFINE_enum(
    "layer_loop",
    "scan",
    ["scan", "unrolled"],
    "Step layer loop: scan (fast "
    "compiles) or unrolled (on the H200, 1.5-2.2x faster 7B decode steps, minutes "
    "of compiling; see docs/BENCHMARKS.md).",
)
flags.DEFINE_integer(
    "scan_unroll",
    None,
    "Layers per iteration of the scan layer loop (RunnerConfig.scan_unroll; default: per step, "
    "2 where lora_matmul runs every projection, else 1).",
)
flags.DEFINE_string(
    "xla_options",
    "{}",
    "JSON {XLA compiler option: value} for the model step (RunnerConfig.xla_options), e.g. "
    "'{\"xla_gpu_enable_triton_gemm\": false}' (cuBLAS GEMMs: much faster compiles).",
)
flags.DEFINE_string(
    "sgmv_config",
    "{}",
    "JSON {SgmvConfig field: value}: the SGMV LoRA kernels' tuning (RunnerConfig.sgmv), e.g. "
    "'{\"decode_max_tokens\": 32}'.",
)
flags.DEFINE_string(
    "matmul_config",
    "{}",
    "JSON {MatmulConfig field: value}: the lora_matmul decode projections' tuning "
    "(RunnerConfig.matmul), e.g. '{\"max_tokens\": 64}'.",
)
flags.DEFINE_bool(
    "fuse_projections",
    True,
    "Run q|k|v and gate|up as one GEMM each (fused kernels built at start-up; same outputs).",
)
flags.DEFINE_enum(
    "projection_kernel",
    "auto",
    ["auto", "xla", "pallas"],
    "Decode projections: XLA's GEMMs, or pallas_kernels.lora_matmul (base GEMM and LoRA expand "
    "in one launch; needs --fuse_projections, one GPU); auto: lora_matmul on a GPU with the scan "
    "layer loop, XLA's GEMMs otherwise (RunnerConfig.projection_kernel).",
)
flags.DEFINE_bool(
    "async_scheduling",
    True,
    "Dispatch each engine iteration before reading the "
    "previous one's tokens, so that host work overlaps the GPU's (same outputs).",
)
flags.DEFINE_enum(
    "scheduling_policy",
    "fcfs",
    ["fcfs", "priority", "fair"],
    "fcfs: first come, first served (a request's priority must be 0); priority: lower "
    "`priority` first, preempting lower ones for rows and KV pages (vLLM's); fair: each "
    "adapter's share of the service (VTC: the adapter served least goes first).",
)
flags.DEFINE_list(
    "fair_share_weights",
    [],
    "With --scheduling_policy=fair: name=weight pairs (an adapter's or the base model's name); "
    "a model of weight w gets w times the service of one of weight 1 (the default) while both "
    "are busy, e.g. premium=4,bulk=0.5.",
)
flags.DEFINE_string(
    "api_keys_file",
    "",
    "JSON file of tenants' API keys, each for some models only: "
    '{"keys": [{"name": "acme", "key": "...", "models": ["acme-*"], "admin": false}]} '
    "(jaxlora.server.keys; beside --api_key, which reaches everything).",
)
flags.DEFINE_bool(
    "metrics_need_key",
    False,
    "GET /metrics takes an admin API key (it shows every key's usage); off: open, as vLLM's.",
)
flags.DEFINE_enum(
    "fair_share_by",
    "model",
    ["model", "key"],
    "With --scheduling_policy=fair, whose share it is: each model's (adapters and the base "
    "model), or each API key's (a customer's requests to all its adapters together).",
)
flags.DEFINE_integer("tensor_parallel_size", 1, "Devices the model is split over (Megatron).")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and activations."
)
flags.DEFINE_integer("seed", 0, "Seed of a preset's random weights.")
flags.DEFINE_integer("load_workers", 2, "Threads reading cold adapters from disk.")
flags.DEFINE_float(
    "first_token_deadline_s", None, "Drop (503) requests not started within this many seconds."
)
flags.DEFINE_string(
    "compilation_cache_dir",
    os.path.join("~", ".cache", "jaxlora", "xla"),
    "JAX persistent compilation cache (restarts skip compiling); empty: off.",
)
flags.DEFINE_integer(
    "max_body_mib", 32, "Request bodies larger than this many MiB are refused (413)."
)
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "Log level.")

# vLLM's names for the same sizes, so that a vLLM command line carries over (each sets the
# flag it names; `--help` lists them as aliases).
VLLM_FLAG_ALIASES = {
    "max_num_seqs": "max_batch",
    "max_num_batched_tokens": "max_num_tokens",
    "max_loras": "max_slots",
    "max_lora_rank": "max_rank",
    "enable_log_requests": "log_requests",
    "block_size": "page_size",
}
for _alias, _name in VLLM_FLAG_ALIASES.items():
    flags.DEFINE_alias(_alias, _name)

# vLLM's options with nothing to change here, or refused (after this module's own flags: an
# option of the same name is never defined twice).
from jaxlora import vllm_options  # noqa: E402

vllm_options.define_flags()


def vllm_spelling(argv: list[str]) -> list[str]:
    """argv with vLLM's dashed long options in absl's spelling: ``--max-num-seqs=8`` as
    ``--max_num_seqs=8``, ``--no-enable-prefix-caching`` as ``--noenable_prefix_caching``,
    where the underscored name is a defined flag (anything else is left for absl to judge);
    nothing after a lone ``--`` is touched."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if i > 0 and arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, sep, value = arg[2:].partition("=")
            underscored = name.replace("-", "_")
            if underscored in FLAGS:
                arg = f"--{underscored}{sep}{value}"
            elif underscored.startswith("no_") and underscored[3:] in FLAGS and not sep:
                arg = f"--no{underscored[3:]}"
        out.append(arg)
    return out


def _lora_module_item(item: str) -> str:
    """One item of vLLM's --lora-modules as ``name=path``: a JSON object's name and path
    (its base_model_name is the one base model served here), anything else as it is."""
    import json

    if not item.lstrip().startswith("{"):
        return item
    try:
        spec = json.loads(item)
    except json.JSONDecodeError as e:
        spec = f"not valid JSON ({e})"
    if not (
        isinstance(spec, dict)
        and isinstance(spec.get("name"), str)
        and isinstance(spec.get("path"), str)
    ):
        raise flags.IllegalFlagValueError(
            f"--lora-modules item {item!r}: expected name=path or a JSON object with string "
            f'"name" and "path" (vLLM\'s form), got {spec!r}'
        )
    if "," in spec["name"] + spec["path"]:
        raise flags.IllegalFlagValueError(
            f"--lora-modules item {item!r}: a name or path with a comma cannot be listed"
        )
    return f"{spec['name']}={spec['path']}"


def vllm_values(argv: list[str]) -> list[str]:
    """argv (absl's spelling) with vLLM's argument forms made absl's: the items after
    ``--lora_modules`` up to the next option (vLLM's nargs="+": ``--lora-modules a=/x b=/y``,
    JSON objects included) joined into ``--lora_modules=a=/x,b=/y``, and the first positional
    argument taken as ``--model`` (``vllm serve MODEL``) unless --model is given. A value that
    follows a non-boolean flag (``--port 8000``) stays that flag's; nothing after a lone
    ``--`` is touched. flags.Error for a JSON item without a name and a path."""
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    model_given = any(a == "--model" or a.startswith("--model=") for a in options)
    out, i = argv[:1], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if arg == "--lora_modules":
            items = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                items.append(_lora_module_item(argv[i + 1]))
                i += 1
            out.append(f"--lora_modules={','.join(items)}" if items else arg)
        elif arg.startswith("--lora_modules={"):
            out.append(f"--lora_modules={_lora_module_item(arg.partition('=')[2])}")
        elif arg.startswith("-"):
            out.append(arg)
            name = arg.lstrip("-")
            flag = FLAGS[name] if "=" not in name and name in FLAGS else None
            if flag is not None and not flag.boolean and i + 1 < len(argv):
                i += 1
                out.append(argv[i])  # the flag's value
        elif not model_given:
            out.append(f"--model={arg}")
            model_given = True
        else:
            out.append(arg)  # main's "unexpected arguments"
        i += 1
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse of argv (a bad flag: its one-line error, exit 1) after ``vllm_spelling``
    and ``vllm_values`` (``app.run(main, flags_parser=...)``)."""
    import sys

    from absl import app

    try:
        argv = vllm_values(vllm_spelling(argv))
    except flags.Error as error:  # as absl reports its own
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def set_up_process() -> None:
    """Logging at --log_level and JAX's compilation cache at --compilation_cache_dir."""
    import jax

    logging.basicConfig(
        level=FLAGS.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if FLAGS.compilation_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache_dir)
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str, *, flag: str) -> int:
    """Bytes from "20GiB", "16 GB", "512MiB", "1.5GiB" or a plain count; ConfigError naming
    the flag otherwise."""
    from jaxlora.errors import ConfigError

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ConfigError(
            f"{flag}={text!r}: expected bytes, or a number with a unit "
            f"({', '.join(u for u in _BYTE_UNITS if u)} in any case), e.g. 20GiB"
        )
    count = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if count < 1:
        raise ConfigError(f"{flag}={text!r}: expected at least one byte")
    return count


def _log_requests() -> bool:
    from jaxlora.errors import ConfigError

    if FLAGS.log_requests and FLAGS.disable_log_requests:
        raise ConfigError(
            "--log_requests (--enable_log_requests) and --disable_log_requests were both given "
            "(expected one; without either, no per-request lines are logged)"
        )
    return FLAGS.log_requests


def launch_config():
    """The ``LaunchConfig`` the flags describe; JaxloraError (naming the flag) for a bad JSON
    option."""
    from jaxlora.config import parse_positive_ints
    from jaxlora.engine.runner import xla_options_from_json
    from jaxlora.server.launch import LaunchConfig, parse_fair_share_weights
    from pallas_kernels.lora_matmul import MatmulConfig
    from pallas_kernels.sgmv import SgmvConfig

    api_key = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get("JAXLORA_API_KEY")
    xla_options = xla_options_from_json(FLAGS.xla_options, where="--xla_options")
    sgmv = SgmvConfig.from_json(
        FLAGS.sgmv_config or "{}",
        where="--sgmv_config",
        set_elsewhere={"deterministic": "--[no]deterministic"},
    )
    matmul = MatmulConfig.from_json(FLAGS.matmul_config or "{}", where="--matmul_config")
    for note in vllm_options.check_vllm_options():
        logging.getLogger("jaxlora.launch").info("%s", note)
    return LaunchConfig(
        model=FLAGS.model,
        served_model_name=FLAGS.served_model_name,
        enable_lora=FLAGS.enable_lora,
        lora_modules=tuple(FLAGS.lora_modules),
        lora_dirs=tuple(FLAGS.lora_dirs),
        pinned_adapters=tuple(FLAGS.pinned_adapters),
        allowed_adapter_roots=tuple(FLAGS.allowed_adapter_roots),
        allowed_origins=tuple(FLAGS.allowed_origins),
        allow_credentials=FLAGS.allow_credentials,
        allowed_methods=tuple(FLAGS.allowed_methods),
        allowed_headers=tuple(FLAGS.allowed_headers),
        return_tokens_as_token_ids=FLAGS.return_tokens_as_token_ids,
        enable_prompt_tokens_details=FLAGS.enable_prompt_tokens_details,
        docs=not FLAGS.disable_fastapi_docs,
        max_logprobs=FLAGS.max_logprobs,
        response_role=FLAGS.response_role,
        log_requests=_log_requests(),
        load_adapters_on_demand=FLAGS.load_adapters_on_demand,
        max_request_merges=FLAGS.max_request_merges,
        stream_interval=FLAGS.stream_interval,
        switch_interval_ms=FLAGS.switch_interval_ms,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        tokenizer=FLAGS.tokenizer,
        chat_template=FLAGS.chat_template,
        generation_config=FLAGS.generation_config,
        trust_request_chat_template=FLAGS.trust_request_chat_template,
        tool_call_parser=FLAGS.tool_call_parser,
        enable_auto_tool_choice=FLAGS.enable_auto_tool_choice,
        reasoning_parser=FLAGS.reasoning_parser,
        api_key=api_key or None,
        api_keys_file=FLAGS.api_keys_file,
        dtype=FLAGS.dtype,
        seed=FLAGS.seed,
        tensor_parallel_size=FLAGS.tensor_parallel_size,
        load_workers=FLAGS.load_workers,
        first_token_deadline_s=FLAGS.first_token_deadline_s,
        max_body_mib=FLAGS.max_body_mib,
        max_batch=FLAGS.max_batch,
        max_prefill_rows=FLAGS.max_prefill_rows,
        prefill_chunk=FLAGS.prefill_chunk,
        prefill_key_block=FLAGS.prefill_key_block,
        prefill_context_buckets=parse_positive_ints(
            FLAGS.prefill_context_buckets, flag="--prefill_context_buckets"
        ),
        max_num_tokens=FLAGS.max_num_tokens,
        max_waiting=FLAGS.max_waiting,
        page_size=FLAGS.page_size,
        kv_pages=FLAGS.kv_pages,
        kv_cache_memory_bytes=(
            None
            if FLAGS.kv_cache_memory is None
            else parse_bytes(FLAGS.kv_cache_memory, flag="--kv_cache_memory")
        ),
        gpu_memory_utilization=FLAGS.gpu_memory_utilization,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        max_model_len=FLAGS.max_model_len,
        adapter_pool_pages=FLAGS.adapter_pool_pages,
        adapter_pool_axis_pages=tuple(FLAGS.adapter_pool_axis_pages),
        adapter_host_memory_bytes=(
            None
            if FLAGS.adapter_host_memory is None
            else parse_bytes(FLAGS.adapter_host_memory, flag="--adapter_host_memory")
        ),
        max_cpu_loras=FLAGS.max_cpu_loras,
        rows_per_page=FLAGS.rows_per_page,
        max_rank=FLAGS.max_rank,
        max_slots=FLAGS.max_slots,
        layer_loop=FLAGS.layer_loop,
        scan_unroll=FLAGS.scan_unroll,
        xla_options=xla_options,
        fuse_projections=FLAGS.fuse_projections,
        projection_kernel=FLAGS.projection_kernel,
        sgmv=sgmv,
        matmul=matmul,
        kv_write=FLAGS.kv_write,
        residual_norm=FLAGS.residual_norm,
        prefill_attention=FLAGS.prefill_attention,
        deterministic=FLAGS.deterministic,
        async_scheduling=FLAGS.async_scheduling,
        scheduling_policy=FLAGS.scheduling_policy,
        fair_share_weights=parse_fair_share_weights(FLAGS.fair_share_weights),
        fair_share_by=FLAGS.fair_share_by,
        metrics_need_key=FLAGS.metrics_need_key,
    )

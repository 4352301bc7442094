"""vLLM's serve options carry over: the ones this server implements do what vLLM's do
(--max-cpu-loras, --disable-fastapi-docs, --return-tokens-as-token-ids, the CORS options,
--root-path, --uvicorn-log-level), the ones with nothing to change here are taken with a log line
saying why, and the ones asking for what this server does not do are refused at launch, naming
the option (jaxlora.vllm_options)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from absl import flags

from configs.models import LLAMA2_7B
from jaxlora import launch_flags
from jaxlora.errors import ConfigError
from jaxlora.server.launch import LaunchConfig, adapter_host_bytes, check_no_adapter_flags
from tests.test_server_helpers import API_KEY, start_demo_server

# A vLLM multi-LoRA command line (its options spelled as vLLM's docs spell them).
VLLM_COMMAND = [
    "serve.py",
    "tiny",
    "--enable-lora",
    "--max-loras=2",
    "--max-lora-rank=16",
    "--max-cpu-loras=4",
    "--enforce-eager",
    "--trust-remote-code",
    "--disable-log-stats",
    "--swap-space=8",
    "--enable-chunked-prefill",
    "--disable-frontend-multiprocessing",
    "--pipeline-parallel-size=1",
    "--quantization=None",
    "--lora-dtype=auto",
    "--load-format=safetensors",
    "--guided-decoding-backend=xgrammar",
    "--allow-credentials",
    "--allowed-origins=https://app.example.com",
    "--allowed-methods=GET,POST",
    "--return-tokens-as-token-ids",
    "--disable-fastapi-docs",
    "--enable-prompt-tokens-details",
]


def _launch(argv):
    try:
        launch_flags.parse_flags(argv)
        return launch_flags.launch_config()
    finally:
        flags.FLAGS.unparse_flags()


def test_a_vllm_command_line_launches_with_a_note_for_each_option_that_changes_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="jaxlora.launch"):
        launch = _launch(VLLM_COMMAND)
    assert (launch.max_slots, launch.max_rank, launch.max_cpu_loras) == (2, 16, 4)
    assert launch.allow_credentials and launch.allowed_methods == ("GET", "POST")
    assert launch.return_tokens_as_token_ids and not launch.docs
    assert launch.enable_prompt_tokens_details
    notes = [r.getMessage() for r in caplog.records if r.name == "jaxlora.launch"]
    for option in (
        "--enforce-eager",
        "--trust-remote-code",
        "--disable-log-stats",
        "--swap-space",
        "--enable-chunked-prefill",
        "--disable-frontend-multiprocessing",
        "--pipeline-parallel-size",
        "--quantization",
        "--lora-dtype",
        "--load-format",
        "--guided-decoding-backend",
    ):
        assert sum(note.startswith(option + "=") for note in notes) == 1, (option, notes)
    assert all("changes nothing here: " in note for note in notes)
    assert "XLA-compiled" in next(n for n in notes if n.startswith("--enforce-eager"))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--quantization=awq", r"--quantization 'awq': not supported here \(weights are served"),
        ("--pipeline-parallel-size=2", r"--pipeline-parallel-size 2: .* expected 1"),
        ("--lora-dtype=float16", r"--lora-dtype 'float16': .* expected 'auto' or --dtype's"),
        ("--load-format=pt", r"--load-format 'pt': .* expected 'auto' or 'safetensors'"),
        ("--num-scheduler-steps=8", r"--num-scheduler-steps 8"),
        ("--otlp-traces-endpoint=http://x:4317", r"--otlp-traces-endpoint .*expected it unset"),
        ("--cpu-offload-gb=4", r"--cpu-offload-gb 4.0: .* expected 0.0"),
    ],
)
def test_options_asking_for_what_this_server_does_not_do_are_refused_by_name(option, message):
    with pytest.raises(ConfigError, match=message):
        _launch(["serve.py", "tiny", option])


def test_response_role_must_be_a_role_name():
    from jaxlora.server.config import ServerConfig

    with pytest.raises(ConfigError, match="'response_role' .*expected a role name"):
        ServerConfig(model_name="m", response_role="two words")


def test_lora_dtype_may_name_the_served_dtype_and_max_logprobs_is_at_most_20(caplog):
    with caplog.at_level(logging.INFO, logger="jaxlora.launch"):
        launch = _launch(["serve.py", "tiny", "--dtype=bfloat16", "--lora-dtype=bfloat16"])
    assert launch.dtype == "bfloat16"
    assert any(r.getMessage().startswith("--lora-dtype='bfloat16'") for r in caplog.records)
    assert _launch(["serve.py", "tiny", "--max-logprobs=5"]).max_logprobs == 5
    with pytest.raises(SystemExit):
        _launch(["serve.py", "tiny", "--max-logprobs=50"])


def test_max_cpu_loras_is_the_host_budget_in_adapters_of_the_pool_rank():
    # llama-2-7b, rank 16 on every module, bf16: 16 x (4 x 8,192 + 3 x 15,104) x 32 layers x 2.
    assert adapter_host_bytes(LLAMA2_7B, 16, "bfloat16") == 16 * 78_080 * 32 * 2
    assert adapter_host_bytes(LLAMA2_7B, 64, "float32") == 4 * 2 * 16 * 78_080 * 32 * 2
    with pytest.raises(ConfigError, match="--max_cpu_loras and --adapter_host_memory both"):
        LaunchConfig(max_cpu_loras=2, adapter_host_memory_bytes=2**20)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="--max_cpu_loras: expected an int >= 1"):
            LaunchConfig(max_cpu_loras=bad)
    with pytest.raises(ConfigError, match="--noenable_lora .* --max_cpu_loras"):
        check_no_adapter_flags(
            _launch(["serve.py", "tiny", "--no-enable-lora", "--max-cpu-loras=2"])
        )


def test_max_cpu_loras_sets_the_adapter_store_s_budget():
    from jaxlora.server import launch as launch_module

    state = launch_module.build_state(LaunchConfig(max_batch=2, kv_pages=64, max_cpu_loras=2))
    try:
        pool = state.llm.engine.engine_config.lora_pool
        expected = 2 * adapter_host_bytes(state.llm.config, pool.max_rank, "float32")
        assert state.llm.adapters.store.stats().host_budget_bytes == expected
    finally:
        state.llm.stop()


def test_server_options_docs_token_ids_and_cors():
    """--disable-fastapi-docs: no schema or pages; --return-tokens-as-token-ids: every answer's
    logprobs name tokens by id; --max-logprobs: more logprobs a token are refused, naming the
    field; the CORS options in the preflight answer."""
    server, state = start_demo_server(
        docs=False,
        max_logprobs=2,
        response_role="model",
        return_tokens_as_token_ids=True,
        allowed_origins=("https://app.example.com",),
        allow_credentials=True,
        allowed_methods=("GET", "POST"),
        allowed_headers=("Authorization", "Content-Type"),
    )
    try:
        root = server.base_url.removesuffix("/v1")
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(root + path).status_code == 404, path
        answer = httpx.post(
            server.base_url + "/completions",
            json={"model": "robot", "prompt": "Hi", "max_tokens": 3, "logprobs": 1},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        ).json()
        tokens = answer["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 3 and all(t.startswith("token_id:") for t in tokens), tokens
        for route, fields, param in (
            ("/completions", {"prompt": "Hi", "logprobs": 3}, "logprobs"),
            (
                "/chat/completions",
                {
                    "messages": [{"role": "user", "content": "Hi"}],
                    "logprobs": True,
                    "top_logprobs": 3,
                },
                "top_logprobs",
            ),
            ("/completions", {"prompt": "Hi", "prompt_logprobs": 3}, "prompt_logprobs"),
        ):
            refused = httpx.post(
                server.base_url + route,
                json={"model": "robot", "max_tokens": 2, **fields},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            )
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == param and "expected an int in 0..2" in error["message"]

        # --response-role: a new message's role; a continued one keeps its own (vLLM's).
        def chat(messages, stream=False, **extra):
            return httpx.post(
                server.base_url + "/chat/completions",
                json={
                    "model": "robot",
                    "max_tokens": 2,
                    "messages": messages,
                    "stream": stream,
                    **extra,
                },
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            )

        user = [{"role": "user", "content": "Hi"}]
        assert chat(user).json()["choices"][0]["message"]["role"] == "model"
        first = next(
            line for line in chat(user, stream=True).text.splitlines() if line.startswith("data: {")
        )
        assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["role"] == "model"
        continued = chat(
            [*user, {"role": "assistant", "content": "Beep"}],
            continue_final_message=True,
            add_generation_prompt=False,
        )
        assert continued.json()["choices"][0]["message"]["role"] == "assistant", continued.text
        preflight = httpx.options(
            server.base_url + "/completions",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "Authorization",
            },
        )
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert preflight.headers["access-control-allow-methods"] == "GET, POST"
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
    finally:
        server.stop()

"""scripts/serve.py with no model flags: serves the embedded demo, prints the URL and a curl
example that works as printed, and stops cleanly on SIGTERM, letting a request in flight finish."""

import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time

import httpx
import pytest

from jaxlora import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_command(*flags: str) -> list[str]:
    # Only what keeps the tests short is set: any free loopback port, no compilation cache in
    # the home directory, shapes compiled on first use instead of all up front.
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "serve.py"),
        "--port=0",
        "--compilation_cache_dir=",
        "--nowarmup",
        "--log_level=warning",
        *flags,
    ]


def start_serving(command: list[str], until) -> tuple[subprocess.Popen, list[str]]:
    """serve.py started with command; its output lines read until one satisfies until (or it
    ends, or 120 s pass)."""
    env = {**os.environ, "JAXLORA_API_KEY": "", "XLA_FLAGS": ""}
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if until(line):
            break
    return process, output


def test_serve_script_default_demo_prints_a_working_curl():
    # (the flags of the session's options: an answer without <think> is all content, and a
    # priority is taken)
    command = serve_command(
        "--max_body_mib=1",
        "--reasoning_parser=qwen3",
        "--scheduling_policy=priority",
        "--pinned_adapters=pirate",
        "--allowed_origins=https://app.example.com",
    )
    process, output = start_serving(command, lambda line: line.strip().startswith("-d "))
    try:
        text = "".join(output)
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", text)
        assert match, text
        url = match.group(1)
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        curl = text[text.index("curl ") :]
        words = shlex.split(curl.replace("\\\n", " "))
        body = json.loads(words[words.index("-d") + 1])
        assert words[1] == f"{url}/v1/chat/completions"
        answer = httpx.post(words[1], json=body, timeout=60).json()
        assert answer["choices"][0]["message"]["content"] == demo.DEMO_SIGNATURES[body["model"]]
        assert answer["choices"][0]["message"]["reasoning_content"] is None
        ranked = httpx.post(words[1], json={**body, "priority": -1}, timeout=60).json()
        assert ranked["choices"][0]["message"] == answer["choices"][0]["message"]
        cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert {m["id"] for m in cards} == {demo.DEMO_MODEL_NAME, *demo.DEMO_SIGNATURES}
        pinned = {m["id"]: m["pinned"] for m in cards if m["parent"] is not None}
        assert pinned == {name: name == "pirate" for name in demo.DEMO_SIGNATURES}
        # CORS: a browser page of the allowed origin may call; another may not.
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = httpx.options(
            words[1], headers={"Origin": "https://app.example.com", **preflight}, timeout=10
        )
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        elsewhere = httpx.options(
            words[1], headers={"Origin": "https://evil.example.com", **preflight}, timeout=10
        )
        assert "access-control-allow-origin" not in elsewhere.headers
        too_big = httpx.post(
            words[1], json={**body, "user": "x" * (1 << 20)}, timeout=60
        )  # --max_body_mib=1
        assert too_big.status_code == 413, too_big.text
        assert too_big.json()["error"]["param"] == "body"
        # SIGTERM (a container's stop) while a request streams: new connections are refused,
        # the stream runs to its end, then the server stops cleanly.
        lines, first = [], threading.Event()

        def stream():
            long_run = {**body, "max_tokens": 48, "ignore_eos": True, "stream": True}
            long_run["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", words[1], json=long_run, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert lines[-1] == "[DONE]", lines[-3:]
        chunks = [json.loads(x) for x in lines[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 48
        process.wait(timeout=60)  # (its exit status and last words: below)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            rest, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
    assert process.returncode == 0, "".join(output) + rest
    assert "Traceback" not in rest and "jaxlora: stopped" in rest, rest


def test_vllm_argument_forms_become_absls():
    """vLLM's positional model and space-separated --lora-modules items (name=path or JSON
    objects) become --model= and one comma list; a flag's own value stays its own; a JSON item
    without a name and a path is a one-line flags error."""
    from absl import flags

    from jaxlora import launch_flags

    def converted(*args):
        return launch_flags.vllm_values(launch_flags.vllm_spelling(["serve.py", *args]))

    chat = json.dumps({"name": "chat", "path": "/a/chat", "base_model_name": "qwen"})
    assert converted(
        "/models/qwen3", "--port", "8000", "--lora-modules", "sql=/a/sql", chat, "/a/poet", "--x"
    ) == [
        "serve.py",
        "--model=/models/qwen3",
        "--port",
        "8000",
        "--lora_modules=sql=/a/sql,chat=/a/chat,/a/poet",
        "--x",
    ]
    assert converted(f"--lora-modules={chat}") == ["serve.py", "--lora_modules=chat=/a/chat"]
    # --model given: a positional word is left for main's "unexpected arguments"; so is
    # anything after a lone --.
    assert converted("--model=tiny", "extra") == ["serve.py", "--model=tiny", "extra"]
    assert converted("--", "tiny") == ["serve.py", "--", "tiny"]
    assert converted("--noenable_prefix_caching", "tiny") == [
        "serve.py",
        "--noenable_prefix_caching",
        "--model=tiny",
    ]
    for bad in ('{"name": "x"}', "{not json", '{"name": "a,b", "path": "/p"}'):
        with pytest.raises(flags.Error, match="--lora-modules item"):
            converted("--lora-modules", bad)
    result = subprocess.run(
        [*serve_command("--lora-modules", '{"path": "/p"}')],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "FATAL Flags parsing error: --lora-modules item" in result.stderr


def test_serve_script_takes_a_vllm_command_line():
    """`serve.py MODEL --lora-modules a=/x {"name": ..., "path": ...}` as vLLM's
    `vllm serve` takes it: the demo model by position, two of its adapters by both forms; with
    vLLM's --root-path (the OpenAPI schema's server), --uvicorn-log-level and an option that
    changes nothing here (--enforce-eager, logged as such)."""
    adapters = demo.adapter_dirs()
    robot = json.dumps({"name": "robot", "path": adapters["robot"], "base_model_name": "demo"})
    command = [
        *serve_command(),
        demo.model_dir(),
        "--lora-modules",
        f"pirate={adapters['pirate']}",
        robot,
        "--served-model-name",
        "demo",
        "--root-path",
        "/llm",
        "--uvicorn-log-level",
        "warning",
        "--enforce-eager",
    ]
    process, output = start_serving(command, lambda line: "/v1" in line)
    try:
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", "".join(output))
        assert match, "".join(output)
        cards = httpx.get(f"{match.group(1)}/v1/models", timeout=10).json()["data"]
        assert {m["id"] for m in cards} == {"demo", "pirate", "robot"}
        schema = httpx.get(f"{match.group(1)}/openapi.json", timeout=10).json()
        assert schema["servers"] == [{"url": "/llm"}]
        assert "--enforce-eager=True changes nothing here" in "".join(output)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_serve_script_names_a_bad_xla_or_kernel_option_and_exits():
    """A bad --xla_options, --sgmv_config, --matmul_config or --pinned_adapters is our one-line
    error, not a traceback: bad JSON or a refused kernel field before anything is built, an
    option XLA does not know or an adapter that is not registered when the engine is built."""
    env = {**os.environ, "JAXLORA_API_KEY": "", "XLA_FLAGS": ""}
    for flag, message in (
        ("--xla_options={bad", "error: --xla_options: not valid JSON"),
        ('--xla_options={"xla_no_such_option": 1}', "No such compile option: 'xla_no_such_option'"),
        (
            '--sgmv_config={"decode_block_k": 3}',
            "error: --sgmv_config: SgmvConfig field 'decode_block_k': expected a power of two",
        ),
        ('--matmul_config={"dot_block": 16}', "unknown MatmulConfig field 'dot_block'"),
        ("--pinned_adapters=parrot", "--pinned_adapters: adapter 'parrot' is not registered"),
        ("--allowed_origins=app.example.com", "server config field 'allowed_origins'"),
        ("--quantization=awq", "error: --quantization 'awq': not supported here"),
        ("--fair_share_weights=pirate=x", "error: --fair_share_weights entry 'pirate=x'"),
        ("--api_keys_file=/nowhere/keys.json", "error: /nowhere/keys.json: cannot read"),
        (
            '--sgmv_config={"deterministic": false}',
            "error: --sgmv_config: SgmvConfig field 'deterministic' is set by "
            "--[no]deterministic, not here",
        ),
    ):
        out = subprocess.run(
            serve_command(flag), cwd=REPO, capture_output=True, text=True, timeout=180, env=env
        )
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: ")
        assert "Traceback" not in out.stderr, out.stderr


TLS = os.path.join(REPO, "tests", "fixtures", "tls")


def test_serve_script_serves_https_with_a_certificate():
    """--ssl_certfile / --ssl_keyfile (vLLM's): the banner's URL is https and a client that
    trusts the certificate gets answers; plain HTTP to the port gets none. (Spelled as vLLM's
    dashed options, with vLLM's --max-num-seqs: serve.py takes those too.)"""
    cert = os.path.join(TLS, "cert.pem")
    command = serve_command(
        f"--ssl-certfile={cert}",
        f"--ssl-keyfile={os.path.join(TLS, 'key.pem')}",
        "--max-num-seqs=2",
    )
    process, output = start_serving(command, lambda line: "/v1 (OpenAI-compatible)" in line)
    try:
        text = "".join(output)
        match = re.search(r"at (https://127\.0\.0\.1:(\d+))/v1", text)
        assert match, text
        url, port = match.group(1), match.group(2)
        trust = ssl.create_default_context(cafile=cert)
        assert httpx.get(f"{url}/health", verify=trust, timeout=10).json() == {"status": "ok"}
        models = httpx.get(f"{url}/v1/models", verify=trust, timeout=10).json()["data"]
        assert demo.DEMO_MODEL_NAME in {m["id"] for m in models}
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        except httpx.HTTPError:
            plain = None
        assert plain is None or plain.status_code != 200
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        rest, _ = process.communicate()
    assert process.returncode == 0, text + rest


def test_tls_options_name_the_flags():
    from jaxlora.errors import ConfigError
    from jaxlora.server.launch import tls_options

    cert, key = os.path.join(TLS, "cert.pem"), os.path.join(TLS, "key.pem")
    assert tls_options("", "") == {}
    assert tls_options(cert, key) == {"ssl_certfile": cert, "ssl_keyfile": key}
    for certfile, keyfile, message in (
        (cert, "", "--ssl_certfile and --ssl_keyfile: give both"),
        ("", key, "--ssl_certfile and --ssl_keyfile: give both"),
        (cert, os.path.join(TLS, "other_key.pem"), "cannot load the certificate and its key"),
        ("/nowhere/cert.pem", key, "--ssl_certfile=/nowhere/cert.pem --ssl_keyfile="),
    ):
        try:
            tls_options(certfile, keyfile)
        except ConfigError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"{certfile!r}, {keyfile!r} accepted")


def test_run_batch_script_answers_a_batch_file(tmp_path):
    """scripts/run_batch.py on the embedded demo: every line answered in order (the pirate's
    greedy answer is its signature, as served), a bad line reported, the count printed."""
    requests = tmp_path / "requests.jsonl"
    answers = tmp_path / "answers.jsonl"
    body = {
        "model": "pirate",
        "messages": [{"role": "user", "content": demo.DEMO_PROMPTS[0]}],
        "max_tokens": 32,
        "temperature": 0,
    }
    line = {"custom_id": "one", "method": "POST", "url": "/v1/chat/completions", "body": body}
    requests.write_bytes(json.dumps(line).encode() + b"\n[1, 2]\n\n" + b'{"custom_id": "\xff"}\n')
    command = [
        sys.executable,
        os.path.join(REPO, "scripts", "run_batch.py"),
        f"--input_file={requests}",
        f"--output_file={answers}",
        "--compilation_cache_dir=",
        "--log_level=warning",
    ]
    env = {**os.environ, "JAXLORA_API_KEY": "", "XLA_FLAGS": ""}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert f"jaxlora: 3 requests, 2 failed -> {answers}" in out.stdout, out.stdout
    first, second, third = [json.loads(text) for text in answers.read_text().splitlines()]
    assert "line 4: not UTF-8 text" in third["error"]["message"]
    message = first["response"]["body"]["choices"][0]["message"]
    assert first["custom_id"] == "one" and message["content"] == demo.DEMO_SIGNATURES["pirate"]
    assert (
        second["response"]["status_code"] == 400
        and "expected an object" in second["error"]["message"]
    )
    missing = subprocess.run(
        [*command[:2], "--input_file=/nowhere.jsonl", f"--output_file={answers}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert missing.returncode != 0 and "error: --input_file /nowhere.jsonl" in missing.stderr

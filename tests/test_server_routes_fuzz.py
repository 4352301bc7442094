"""Malformed requests on the routes test_server_fuzz covers less (the Responses API, runtime
adapter loading, SageMaker's /invocations, LoRAX's routes, headers), sent as raw bytes: each gets
a 4xx naming the field and what it expects, in the route's API shape (OpenAI's, or TGI's on
LoRAX's routes), never a 500; and a stream its client cuts releases its request.

Cases marked "was ..." misbehaved before the fixes they test."""

import collections
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import httpx
import pytest

from jaxlora import demo
from tests.test_server_fuzz import INVOKE, LOAD, MAX_BODY, RESPONSES, C, R, check_error, post
from tests.test_server_fuzz import raw as case
from tests.test_server_helpers import (
    API_KEY,
    engine_idle,
    parse_metrics,
    start_demo_server,
    wait_until,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}

# Adapter directories under the served root whose files do not load: (config text, weights).
PIRATE_CONFIG = json.loads(
    (Path(demo.adapter_dirs()["pirate"]) / "adapter_config.json").read_text()
)
BROKEN_ADAPTERS = {
    "config_not_json": ("{not json", None),
    "config_rank_text": (json.dumps({**PIRATE_CONFIG, "r": "x"}), None),
    "weights_garbage": (None, b"garbage"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes_fuzz_adapters")
    pirate = demo.adapter_dirs()["pirate"]
    for name, (config, weights) in BROKEN_ADAPTERS.items():
        shutil.copytree(pirate, root / name)
        if config is not None:
            (root / name / "adapter_config.json").write_text(config)
        if weights is not None:
            (root / name / "adapter_model.safetensors").write_bytes(weights)
    server, state = start_demo_server(
        max_batch=1,
        max_waiting=8,
        adapter_roots=(str(root),),
        max_body_bytes=MAX_BODY,
        disconnect_poll_s=0.05,
    )
    yield server, state
    server.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as client:
        yield client


NESTED = b"[" * 10**5 + b"]" * 10**5
HUGE_INT = b'{"model": "pirate", "prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}"

CASES = [
    # was 500 (TypeError: a list or an object is no role to look up)
    case(
        RESPONSES,
        {**R, "input": [{"role": ["user"], "content": "Hi"}]},
        "responses-role-list",
        "input[0].role",
        "expected one of",
        "got ['user']",
    ),
    case(
        RESPONSES,
        {**R, "input": [{"type": "message", "role": {"a": 1}, "content": "Hi"}]},
        "responses-role-object",
        "input[0].role",
        "expected one of",
    ),
    # was 500 (/invocations parses its body itself: RecursionError, ValueError)
    case(INVOKE, NESTED, "invoke-nested", "body", "not valid JSON", "RecursionError"),
    case(INVOKE, HUGE_INT, "invoke-huge-int", "body", "not valid JSON", "4300 digits"),
    # param was null, and the message named a file of the server's, not the field
    *(
        case(
            LOAD,
            {"lora_name": f"x_{name}", "lora_path": name},
            f"load-{name}",
            "lora_path",
            f"lora_path {name!r}: ",
            reason,
        )
        for name, reason in (
            ("config_not_json", "not valid JSON"),
            ("config_rank_text", "expected a positive int"),
            ("weights_garbage", "not a safetensors file"),
        )
    ),
    case(
        LOAD,
        {"lora_name": "x_root", "lora_path": "."},
        "load-the-root-itself",
        "lora_path",
        "lora_path '.': ",
        "adapter_config.json",
    ),
]


@pytest.mark.parametrize("path, body, status, param, needles", CASES)
def test_malformed_request_gets_a_4xx_naming_the_field(http, path, body, status, param, needles):
    check_error(post(http, path, body), status, param, *needles)


@pytest.mark.parametrize(
    "content_type, shown",
    [
        ("text/plain", "Content-Type 'text/plain'"),
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),  # curl -d
        (None, "no Content-Type"),  # requests.post(url, data=...)
    ],
)
def test_a_body_not_sent_as_json_is_refused_naming_the_content_type(http, content_type, shown):
    """FastAPI reads a body as JSON only where its Content-Type says so (as vLLM requires
    application/json): the answer says so (was "body: Input should be a valid dictionary ...,
    got something else")."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/completions", LOAD):
        response = http.post(path, content=json.dumps(C).encode(), headers=headers)
        check_error(response, 400, "body", "Content-Type: application/json", shown)


def test_a_request_id_header_is_echoed_only_when_it_is_plain_ascii(served):
    """X-Request-Id is echoed where it is a plain token; other bytes (here latin-1 letters,
    which str's \\w matches) get a new id (was echoed, re-encoded as UTF-8: other bytes than
    the client sent)."""
    host, port = served[0].url.removeprefix("http://").split(":")
    for given in (b"\xff\xfe", b"caf\xe9"):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: "
                + given
                + b"\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head = answer.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200"), answer
        [echoed] = [
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-request-id:")
        ]
        assert re.fullmatch(rb"[0-9a-f]{32}", echoed), echoed
    ok = httpx.get(f"{served[0].url}/health", headers={"X-Request-Id": "req-1.a:b@c"})
    assert ok.headers["x-request-id"] == "req-1.a:b@c"


def test_lorax_routes_refuse_an_oversized_body_in_tgi_s_shape(http):
    """A body over max_body_bytes is refused by its Content-Length before it is read; on LoRAX's
    routes in TGI's shape, as every other refusal there (was OpenAI's 413 there, TGI's 422 only
    for a chunked body)."""
    body = json.dumps({"inputs": "x" * (MAX_BODY + 1)}).encode()
    for path in ("/generate", "/generate_stream", "/"):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        answer = response.json()
        assert answer["error_type"] == "validation", answer
        assert answer["error"].startswith("body: ") and "at most 1048576 bytes" in answer["error"]


# A regex whose lexer outgrows llguidance's limits at the first token it reads: the request
# fails in the engine (not when it is checked), before its first token is out.
EXPLODING_REGEX = "(a{1000}){1000}"


def test_a_lorax_stream_that_fails_before_its_first_token_answers_in_tgi_s_shape(http):
    """A stream answers an error that comes before its first token with the error's status;
    on LoRAX's routes in TGI's shape (was OpenAI's 500 on /generate_stream and on POST / with
    stream true, where /generate answered TGI's 424)."""
    body = {
        "inputs": "Hi",
        "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": EXPLODING_REGEX}},
    }
    answers = {
        "/generate": post(http, "/generate", body),
        "/generate_stream": post(http, "/generate_stream", body),
        "/": post(http, "/", {**body, "stream": True}),
    }
    for path, response in answers.items():
        # (424 "generation" where the engine fails it; 422 "validation" if it is ever refused
        # when checked)
        assert response.status_code in (422, 424), (path, response.text)
        answer = response.json()
        assert set(answer) == {"error", "error_type"}, (path, answer)
        assert isinstance(answer["error"], str), (path, answer)
    assert len({r.status_code for r in answers.values()}) == 1, answers


HOLD_TOKENS = 100  # the max tokens of the cut streams' requests (others' are fewer)


@pytest.mark.parametrize(
    "path, body",
    [
        pytest.param(
            RESPONSES, {**R, "max_output_tokens": HOLD_TOKENS, "stream": True}, id="responses"
        ),
        pytest.param(
            "/generate_stream",
            {"inputs": "Hi", "parameters": {"adapter_id": "pirate", "max_new_tokens": HOLD_TOKENS}},
            id="generate_stream",
        ),
        pytest.param(
            "/",
            {
                "inputs": "Hi",
                "stream": True,
                "parameters": {"adapter_id": "pirate", "max_new_tokens": HOLD_TOKENS},
            },
            id="lorax-root-stream",
        ),
    ],
)
def test_a_stream_its_client_cuts_releases_its_request(served, monkeypatch, path, body):
    """The client reads the first event and leaves while the engine is held after that token:
    the server cancels the request, and once the engine goes on it ends (abort), its pages
    free."""
    from jaxlora.engine.request import Request

    server, state = served
    free_before = state.engine.kv.free_pages
    before = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    held, release = threading.Event(), threading.Event()
    push, step = Request.push, state.engine.step

    def push_and_note(self, delta):
        push(self, delta)
        if self.sampling.max_tokens == HOLD_TOKENS and delta.token_ids:
            held.set()

    def step_unless_held():
        # (held here, between steps, not in push: the engine's lock, which a cancel takes, is
        # free meanwhile)
        if held.is_set():
            release.wait(30)
        step()

    monkeypatch.setattr(Request, "push", push_and_note)
    monkeypatch.setattr(state.engine, "step", step_unless_held)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            with client.stream("POST", path, json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # (kept: see test_server's disconnect test)
                assert next(line for line in lines if line.startswith("data: "))
                assert held.is_set()
        assert wait_until(lambda: state.pump.cancelling == 1, timeout=10)
    finally:
        release.set()
    assert wait_until(lambda: engine_idle(state), timeout=20)
    assert state.engine.kv.free_pages == free_before
    after = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    finished = {
        dict(labels)["finish_reason"]: value - before.get((name, labels), 0)
        for (name, labels), value in after.items()
        if name == "jaxlora_requests_finished_total" and value != before.get((name, labels), 0)
    }
    assert finished == {"abort": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_that_fails_while_running_is_the_request_s_fault(http, stream):
    """A grammar that llguidance accepts but gives up on once the output reaches it is a 400
    naming the request's field (was a 500 "engine_error", which clients retry: it fails the
    same way every time); a stream that already started ends with that error in its body."""
    body = {
        "model": "pirate",
        "prompt": "Hi",
        "max_tokens": 4,
        "structured_outputs": {"regex": EXPLODING_REGEX},
        "stream": stream,
    }
    response = post(http, "/v1/completions", body)
    if stream and response.status_code == 200:
        events = [
            json.loads(line[len("data: ") :])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        error = next(e["error"] for e in events if "error" in e)
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == "structured_outputs.regex", error
    assert "failed at output token 0" in error["message"] and "lexer" in error["message"]


def test_the_server_is_unharmed(served, http):
    """Runs last: no request of this module got a 5xx (or a 401, 405, ...), no bad load
    registered an adapter, and greedy requests still give the adapter's answer."""
    server, state = served
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert models == {demo.DEMO_MODEL_NAME, *demo.DEMO_SIGNATURES}
    answer = post(http, "/v1/completions", {**C, "max_tokens": 40})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == " " + demo.DEMO_SIGNATURES["pirate"]
    assert wait_until(lambda: engine_idle(state))
    samples = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    statuses = collections.Counter()
    for (name, labels), value in samples.items():
        if name == "jaxlora_http_responses_total":
            statuses[dict(labels)["status"]] += value
    assert {s for s in statuses if s[0] in "45"} <= {"400", "404", "422", "424"}, statuses

"""API keys, server config validation, the background server, and the key limits and gauges
of a served demo model."""

from __future__ import annotations

import contextlib
import json
import math
import socket

import httpx
import pytest
from fastapi import FastAPI
from fastapi.security.utils import get_authorization_scheme_param

from jaxlora.errors import ConfigError
from jaxlora.server import BackgroundServer
from jaxlora.server.config import ServerConfig
from jaxlora.server.keys import ApiKey, load_api_keys
from tests.test_server_helpers import start_demo_server

SECRET = "sk-acme-0123456789abcdef"


def test_a_key_reaches_an_adapter_whose_name_holds_pattern_characters():
    """An adapter's name may hold '[', '?' or '*' (any printable text): a key that lists the
    name itself uses it (fnmatch alone read "acme[v2]" as acme followed by 'v' or '2'), and a
    plain name still reaches that model only."""
    key = ApiKey("acme", SECRET, ("acme[v2]", "plain?"))
    assert key.allows("acme[v2]") and key.allows("plain?")
    assert key.allows("acmev")  # (still a pattern too, as documented)
    pirate = ApiKey("p", SECRET, ("pirate",))
    assert pirate.allows("pirate")
    assert not any(pirate.allows(m) for m in ("pirate2", "Pirate", "merged-0123456789abcdef"))


@pytest.mark.parametrize(
    "secret", [" sk-acme-0123456789abcdef", "sk-acme-0123456789abcdef ", "sk-acmé-0123456789abcdef"]
)
def test_a_key_no_client_could_send_is_refused(tmp_path, secret):
    """The Bearer value reaches the server stripped, and HTTP clients send ASCII headers only:
    a secret with surrounding whitespace or other characters could never be matched (its
    tenant would get 401 for ever), so the keys file is refused naming the entry and field."""
    assert get_authorization_scheme_param(f"Bearer {SECRET} ")[1] == SECRET
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "key": secret, "models": ["*"]}]}))
    with pytest.raises(ConfigError, match=r"keys\[0\]: API key 'a': key: expected printable ASCII"):
        load_api_keys(str(path))
    with pytest.raises(ConfigError, match="key: expected printable ASCII"):
        ServerConfig(model_name="m", api_key=secret)


def test_a_secret_or_name_used_twice_names_api_key_where_it_is_the_flags():
    """--api_key is not an entry of the keys file: the error says so instead of pointing at an
    entry past the file's end."""
    acme = ApiKey("acme", SECRET)
    with pytest.raises(
        ConfigError, match=r"keys.1..key: .not shown. is used twice \(by keys\[0\] and --api_key\)"
    ):
        ServerConfig(model_name="m", api_key=SECRET, api_keys=(acme,))
    named = ApiKey("api_key", "sk-other-0123456789abcdef")
    with pytest.raises(
        ConfigError, match=r"'api_key' is used twice \(by keys\[1\] and --api_key\)"
    ):
        ServerConfig(model_name="m", api_key="sk-own-0123456789abcdef", api_keys=(acme, named))
    with pytest.raises(
        ConfigError, match=r"keys\[1\]\.name: 'acme' is used twice \(by keys\[0\] and keys\[1\]\)"
    ):
        ServerConfig(model_name="m", api_keys=(acme, ApiKey("acme", "sk-two-0123456789abcdef")))


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("trust_request_chat_template", "--trust_request_chat_template"),
        ("metrics_need_key", "--metrics_need_key"),
        ("allow_credentials", "--allow_credentials"),
        ("auto_tool_choice", "--enable_auto_tool_choice"),
        ("docs", "--docs"),
        ("log_requests", "--log_requests"),
        ("return_tokens_as_token_ids", "--return_tokens_as_token_ids"),
        ("enable_prompt_tokens_details", "--enable_prompt_tokens_details"),
        ("load_adapters_on_demand", "--load_adapters_on_demand"),
    ],
)
def test_switches_take_bools_only(field, flag):
    """A switch given "false" (a string from an env var or a YAML file) was read as its truth
    value: on (trust_request_chat_template="false" let requests run their own templates)."""
    with pytest.raises(
        ConfigError, match=rf"'{field}' \({flag}\): expected True or False, got 'false'"
    ):
        ServerConfig(model_name="m", api_key="k", **{field: "false"})
    assert getattr(ServerConfig(model_name="m", api_key="k", **{field: False}), field) is False


def test_poll_intervals_and_deadline_are_finite_seconds():
    """stream_poll_s=inf (or True, 1 s) was taken: the poller that feeds every stream would
    sleep for ever after its first pass."""
    for field in ("stream_poll_s", "disconnect_poll_s"):
        for value in (math.inf, True, 0, -1.0, math.nan):
            with pytest.raises(ConfigError, match=rf"'{field}': expected finite seconds > 0"):
                ServerConfig(model_name="m", **{field: value})
    with pytest.raises(ConfigError, match=r"'first_token_deadline_s' \(--first_token_deadline_s\)"):
        ServerConfig(model_name="m", first_token_deadline_s=True)
    assert ServerConfig(model_name="m", stream_poll_s=0.5, first_token_deadline_s=2).stream_poll_s


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        (("temperature", math.nan), "temperature: expected a number >= 0, got nan"),
        (("temperature", -1.0), "temperature: expected a number >= 0"),
        (("top_p", 0.0), r"top_p: expected a number in \(0, 1\]"),
        (("max_tokens", 0), "max_tokens: expected an int >= 1, got 0"),
        (("max_tokens", 2.5), "max_tokens: expected an int >= 1, got 2.5"),
    ],
)
def test_sampling_defaults_are_checked_as_generation_config_values(pair, needle):
    """A default every request would take was taken unchecked (max_tokens 2.5, temperature
    nan): each request that left the field unset failed instead of the server at start-up."""
    with pytest.raises(ConfigError, match=rf"'sampling_defaults': {needle}"):
        ServerConfig(model_name="m", sampling_defaults=(pair,))


def test_adapter_roots_as_one_string_is_refused_naming_the_flag(tmp_path):
    """adapter_roots="/adapters" was read one character at a time ("'/' is a directory, 'a'
    is not")."""
    with pytest.raises(
        ConfigError, match=r"'adapter_roots' \(--allowed_adapter_roots\): expected a tuple"
    ):
        ServerConfig(model_name="m", adapter_roots=str(tmp_path))
    assert ServerConfig(model_name="m", adapter_roots=[tmp_path]).adapter_roots == (str(tmp_path),)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_server_that_fails_to_start_releases_its_socket():
    """An app whose start-up fails: start() raises ConfigError, the bound socket is closed (it
    was left bound, and the port held, for as long as the process lived) and uvicorn's
    SystemExit stays in its thread."""

    @contextlib.asynccontextmanager
    async def failing(app):
        raise RuntimeError("start-up fails")
        yield

    server = BackgroundServer(FastAPI(lifespan=failing), log_level="critical")
    with pytest.raises(ConfigError, match="failed to start"):
        server.start(timeout=30)
    assert server._socket.fileno() == -1


@pytest.mark.parametrize(
    ("host", "url_host"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("::", "[::1]"), ("0.0.0.0", "127.0.0.1")],
)
def test_a_background_server_listens_on_ipv4_and_ipv6_addresses(host, url_host):
    """BackgroundServer bound IPv4 sockets only: an IPv6 host ("::1") failed to bind."""
    if ":" in host:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    with BackgroundServer(app, host=host, log_level="critical") as server:
        assert server.url == f"http://{url_host}:{server.port}"
        assert httpx.get(f"{server.url}/ping", timeout=10).json() == {"ok": True}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"model_name": ""}, r"'model_name' \(--served_model_name\): expected a non-empty string"),
        ({"api_key": ""}, r"'api_key' \(--api_key\): expected"),
        ({"adapter_roots": ("/no/such/dir",)}, r"\(--allowed_adapter_roots\): '/no/such/dir'"),
        ({"tool_call_parser": "xml"}, r"'tool_call_parser' \(--tool_call_parser\): expected"),
        ({"reasoning_parser": "o1"}, r"'reasoning_parser' \(--reasoning_parser\): expected"),
        ({"allowed_origins": ("example.com",)}, r"'allowed_origins' \(--allowed_origins\)"),
        ({"allowed_methods": ()}, r"'allowed_methods' \(--allowed_methods\): expected"),
        ({"allowed_headers": ("a b",)}, r"'allowed_headers' \(--allowed_headers\): expected"),
        ({"max_body_bytes": 0}, r"'max_body_bytes' \(--max_body_mib, in MiB\): expected an int"),
    ],
)
def test_config_errors_name_the_flag(fields, needle):
    """What scripts/serve.py's user reads names the flag they gave, not the field alone
    (--max_body_mib sets max_body_bytes; --served_model_name, model_name)."""
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**{"model_name": "m", **fields})


def test_a_request_its_keys_limits_never_take_at_once_is_a_400():
    """n choices (times the prompts) above the key's max_in_flight, or above its minute's
    tokens together, were a 429 for ever (each retry refused again); a 400 naming the field."""
    capped = ApiKey("capped", "sk-capped-0123456789abcdef", ("*",), max_in_flight=2)
    metered = ApiKey("metered", "sk-metered-0123456789abcdef", ("*",), max_tokens_per_minute=100)
    server, state = start_demo_server(api_key=None, api_keys=(capped, metered))
    try:

        def post(key, **body):
            body = {"model": "robot", "prompt": "Hi", "max_tokens": 40, **body}
            headers = {"Authorization": f"Bearer {key.key}"}
            return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)

        refused = post(capped, n=3)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
        assert post(capped, n=2, max_tokens=2).status_code == 200
        refused = post(metered, n=3)  # 3 x (prompt + 40) > 100
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
        assert post(metered, n=2, temperature=0).status_code == 200
        assert not state._in_flight
    finally:
        server.stop()


def test_every_per_request_merge_counts_in_the_merged_label():
    from types import SimpleNamespace

    from jaxlora.server.state import ServingState

    fake = SimpleNamespace(config=SimpleNamespace(model_name="base"))
    fake.model_label = lambda adapter: ServingState.model_label(fake, adapter)
    counts = {None: 2, "merged-0123456789abcdef": 1, "merged-fedcba9876543210": 3, "pirate": 1}
    assert ServingState._per_model_label(fake, counts) == {
        ("base",): 2,
        ("merged-*",): 4,
        ("pirate",): 1,
    }

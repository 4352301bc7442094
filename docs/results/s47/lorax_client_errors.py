"""Forty-seventh session: lorax-client 0.6.3 (installed into /tmp/lxsite as in the forty-sixth
session, kept out of the dev environment) against the demo server, after the LoRAX routes took
TGI's error shape and statuses: which error classes it raises now, and a stream's events.
Run from the repository root; output: lorax_client_errors.txt."""

import sys

sys.path.insert(0, ".")
from tests.test_server_helpers import API_KEY, start_demo_server

sys.path.append("/tmp/lxsite")
from lorax import Client  # noqa: E402
from lorax.errors import NotFoundError, ValidationError  # noqa: E402

server, state = start_demo_server()
client = Client(server.base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {API_KEY}"})
for name, call, expected in (
    (
        "hub source",
        lambda: client.generate("Hi", adapter_id="robot", adapter_source="hub"),
        ValidationError,
    ),
    ("typical_p", lambda: client.generate("Hi", typical_p=0.5), ValidationError),
    ("unknown adapter", lambda: client.generate("Hi", adapter_id="nope"), NotFoundError),
    (
        "stream, hub source",
        lambda: list(client.generate_stream("Hi", adapter_id="robot", adapter_source="hub")),
        ValidationError,
    ),
):
    try:
        call()
        print(name, "-> no error (unexpected)")
    except Exception as e:  # noqa: BLE001
        print(name, "->", type(e).__name__, isinstance(e, expected), str(e)[:120])
events = list(client.generate_stream("Hi", adapter_id="pirate", max_new_tokens=12))
print("stream:", len(events), "events; last details:", events[-1].details.finish_reason)
server.stop()

"""Forty-sixth session: lorax-client 0.6.3 (pip download lorax-client; installed with its
dependencies into /tmp/lxsite, kept out of the dev environment: it pins certifi==2024.7.4)
against the demo server: generate, generate_stream, sampling with alternatives and prefill, a
JSON response_format, the errors it raises, and the AsyncClient. Output: lorax_client_check.txt."""

import sys

sys.path.insert(0, ".")  # run from the repository root
from tests.test_server_helpers import API_KEY, start_demo_server

sys.path.append("/tmp/lxsite")
import asyncio

from lorax import AsyncClient, Client

server, state = start_demo_server()
url = server.base_url.removesuffix("/v1")
client = Client(url, headers={"Authorization": f"Bearer {API_KEY}"})
r = client.generate("Hi", adapter_id="robot", max_new_tokens=40)
print(
    "generate:",
    repr(r.generated_text),
    r.details.finish_reason,
    r.details.generated_tokens,
    r.details.prompt_tokens,
)
print(
    "tokens:", [(t.id, t.text, round(t.logprob, 3), t.special) for t in r.details.tokens][:4], "..."
)
text = ""
n = 0
for resp in client.generate_stream("Hi", adapter_id="pirate", max_new_tokens=40):
    n += 1
    if not resp.token.special:
        text += resp.token.text
    if resp.details:
        print("stream last:", repr(resp.generated_text), resp.details)
print("stream:", n, "events, concatenated", repr(text))
r = client.generate(
    "Hi",
    max_new_tokens=40,
    return_k_alternatives=2,
    decoder_input_details=True,
    do_sample=True,
    temperature=0.7,
    seed=3,
)
print(
    "base sampled:",
    repr(r.generated_text),
    "alts",
    r.details.tokens[0].alternative_tokens,
    "prefill",
    r.details.prefill[:2],
)
r = client.generate(
    "Hi",
    adapter_id="robot",
    max_new_tokens=40,
    response_format={
        "type": "json_object",
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    },
)
print("json:", repr(r.generated_text))
try:
    client.generate("Hi", adapter_id="robot", adapter_source="hub")
except Exception as e:
    print("hub refused:", type(e).__name__, str(e)[:200])
try:
    client.generate("Hi", adapter_id="nope")
except Exception as e:
    print("unknown:", type(e).__name__, str(e)[:200])


async def main():
    ac = AsyncClient(url, headers={"Authorization": f"Bearer {API_KEY}"})
    r = await ac.generate("Hi", adapter_id="poet", max_new_tokens=40)
    print("async:", repr(r.generated_text))
    s = ""
    async for resp in ac.generate_stream("Hi", adapter_id="poet", max_new_tokens=40):
        if not resp.token.special:
            s += resp.token.text
    print("async stream:", repr(s))


asyncio.run(main())
server.stop()

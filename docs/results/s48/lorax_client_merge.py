"""Forty-eighth session: lorax-client 0.6.3 (installed into /tmp/lxsite, outside the dev
environment: ``pip install --target /tmp/lxsite lorax-client==0.6.3``) sending LoRAX's
per-request ``merged_adapters`` to the demo server: each strategy runs, the pirate alone at
weight 1 answers as the pirate does, a stream too, and a refused merge raises lorax-client's
error classes. Run from the repository root; output: lorax_client_merge.txt."""

import sys

sys.path.insert(0, ".")
from tests.test_server_helpers import API_KEY, start_demo_server

sys.path.append("/tmp/lxsite")
from lorax import Client, MergedAdapters  # noqa: E402

server, state = start_demo_server()
client = Client(server.base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {API_KEY}"})


def text(**kw):
    return client.generate("Hi", max_new_tokens=10, **kw).generated_text


pirate, robot = text(adapter_id="pirate"), text(adapter_id="robot")
print("pirate:", repr(pirate))
print("robot: ", repr(robot))
alone = MergedAdapters(ids=["pirate"], weights=[1.0], density=1.0)
print("merge of the pirate alone equals the pirate:", text(merged_adapters=alone) == pirate)
for strategy in ("linear", "ties", "dare_linear", "dare_ties"):
    merge = MergedAdapters(
        ids=["robot", "pirate"],
        weights=[0.5, 0.5],
        merge_strategy=strategy,
        density=0.5,
        majority_sign_method="total",
    )
    print(f"{strategy:12s}", repr(text(merged_adapters=merge)))
events = list(client.generate_stream("Hi", max_new_tokens=10, merged_adapters=alone))
print("stream of the pirate alone:", "".join(e.token.text for e in events) == pirate)
print("adapters now:", sorted(n for n in state.adapters.store.names() if n.startswith("merged-")))
for name, merge in (
    ("unknown part", MergedAdapters(ids=["pirate", "nobody"], weights=[1.0, 1.0], density=1.0)),
    ("base model as a part", MergedAdapters(ids=["jaxlora-demo"], weights=[1.0], density=1.0)),
):
    try:
        text(merged_adapters=merge)
        print(name, "-> no error (unexpected)")
    except Exception as e:  # noqa: BLE001
        print(name, "->", type(e).__name__, str(e)[:110])
server.stop()

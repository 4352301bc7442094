"""Forty-sixth session: waits for serve.py (an HF checkpoint with a PEFT adapter) to be ready,
asks the base model and every adapter /v1/models lists for the same greedy completion of a
token-id prompt with return_token_ids (the checkpoint has no tokenizer: no text), prints the
output token ids (an adapter's must differ from the base's; streamed, they must add up to the
unstreamed answer's), then /metrics' device-memory and KV lines. python3 serve_hf_check.py
PORT"""

import json
import sys
import time
import urllib.error
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
t0 = time.perf_counter()
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.perf_counter() - t0 > 280:
        sys.exit("not ready")
    time.sleep(2)
print(f"ready after {time.perf_counter() - t0:.1f} s", flush=True)
with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
    models = [m["id"] for m in json.load(r)["data"]]
print("models:", models, flush=True)
texts = {}
for model in models:
    body = {"model": model, "prompt": list(range(100, 356)), "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(
        f"{base}/v1/completions",
        json.dumps({**body, "logprobs": 1, "return_token_ids": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    t1 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"completion {model}: {e.code} {e.read().decode()}")
    choice = answer["choices"][0]
    texts[model] = tuple(choice["token_ids"])
    print(
        f"{model}: {time.perf_counter() - t1:.2f} s, usage {answer['usage']}, "
        f"finish {choice['finish_reason']}, text {choice['text']!r}, "
        f"token_ids {choice['token_ids']}, "
        f"first logprobs {choice['logprobs']['token_logprobs'][:4]}",
        flush=True,
    )
    streamed = urllib.request.Request(
        f"{base}/v1/completions",
        json.dumps({**body, "stream": True, "return_token_ids": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    ids, chunks = [], 0
    with urllib.request.urlopen(streamed, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                chunks += 1
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    print(f"{model} streamed: {chunks} chunks, token_ids {ids}", flush=True)
    if tuple(ids) != texts[model]:
        sys.exit(f"{model}: the streamed tokens are not the answer's")
if len(set(texts.values())) != len(texts):
    sys.exit(f"two models gave the same tokens: {texts}")
with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
    metrics = r.read().decode()
print("\n".join(line for line in metrics.splitlines() if "device_memory" in line or "kv_" in line))

"""Fifty-second session (for the next GPU call): waits for scripts/serve.py to be ready, sends
N concurrent greedy completions of token-id prompts of LEN tokens (max_tokens 16,
return_token_ids; each prompt its own tokens), prints each one's time, usage and finish reason,
then /metrics' device-memory lines (the peak against the allocator's limit). Exit status 1 if
any request fails. python3 serve_long_check.py PORT N LEN"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

port, count, length = (int(a) for a in sys.argv[1:4])
base = f"http://127.0.0.1:{port}"
start = time.perf_counter()
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    if time.perf_counter() - start > 400:
        sys.exit("not ready")
    time.sleep(2)
print(f"ready after {time.perf_counter() - start:.1f} s", flush=True)
with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
    model = json.load(response)["data"][0]["id"]
results, failures = {}, []


def complete(i):
    prompt = [100 + (i * 37 + j) % 300 for j in range(length)]
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(
        f"{base}/v1/completions",
        json.dumps({**body, "return_token_ids": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.load(response)
    except (urllib.error.URLError, OSError) as error:
        detail = error.read().decode() if isinstance(error, urllib.error.HTTPError) else ""
        failures.append(f"request {i}: {error} {detail}")
        return
    choice = answer["choices"][0]
    results[i] = (time.perf_counter() - began, answer["usage"], choice["finish_reason"])


threads = [threading.Thread(target=complete, args=(i,)) for i in range(count)]
began = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(f"{count} x {length}-token prompts: {time.perf_counter() - began:.1f} s", flush=True)
for i in sorted(results):
    seconds, usage, finish = results[i]
    print(f"request {i}: {seconds:.1f} s, usage {usage}, finish {finish}", flush=True)
for failure in failures:
    print(failure, flush=True)
with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
    for line in response.read().decode().splitlines():
        if line.startswith("jaxlora_device_memory_bytes") or "kv_pages" in line:
            print(line, flush=True)
sys.exit(1 if failures else 0)

"""Forty-first session: waits for serve.py (llama-2-7b preset at --gpu_memory_utilization=0.9)
to be ready, asks for one completion and prints /metrics' device-memory lines."""

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
    if time.perf_counter() - t0 > 220:
        sys.exit("not ready")
    time.sleep(2)
print(f"ready after {time.perf_counter() - t0:.1f} s", flush=True)
with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
    model = json.load(r)["data"][0]["id"]
# A preset has random weights and no tokenizer: the prompt is token ids.
body = json.dumps({"model": model, "prompt": list(range(100, 356)), "max_tokens": 16}).encode()
request = urllib.request.Request(
    f"{base}/v1/completions", body, headers={"Content-Type": "application/json"}
)
t1 = time.perf_counter()
try:
    with urllib.request.urlopen(request, timeout=120) as r:
        answer = json.load(r)
except urllib.error.HTTPError as e:
    sys.exit(f"completion: {e.code} {e.read().decode()}")
print(f"completion in {time.perf_counter() - t1:.2f} s: usage {answer['usage']}", flush=True)
with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
    metrics = r.read().decode()
print("\n".join(line for line in metrics.splitlines() if "device_memory" in line or "kv_" in line))

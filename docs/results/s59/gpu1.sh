# Fifty-ninth session, call 1 (H100; carry [".whl"]): the fifty-eighth session's unrun call 4
# (docs/results/s58/gpu4.sh): call 3's serving trace (16 req/s offered, 5 adapters) in-process,
# then through the OpenAI server at the interpreter's switch interval (5 ms) and at 0.5 ms; each
# pass's engine host phases, wall and CPU. Stops before the benchmark if fastapi cannot import.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=.:/tmp/site
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S
python3 -c "import fastapi, httpx, uvicorn, httptools, uvloop, jaxlora.server; print('fastapi', fastapi.__version__, 'httpx', httpx.__version__, 'uvicorn', uvicorn.__version__)" >> $S 2>&1 || { cat $S; exit 3; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
timeout 330 python3 scripts/benchmark.py --section=serving --online_adapters=5 --online_rate=16 \
  --online_duration_s=30 --online_drain_s=30 --serving_switch_interval_ms=0,0.5 \
  --json_out=$R/serving16.json > $R/serving16.log 2>&1
echo "serving rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|matmul rate|online n=|serving n=|Error|error" $R/serving16.log | grep -v "^W" >> $S
sed -n '/### Serving over HTTP/,/### Targets/p' $R/serving16.log >> $S
python3 - >> $S 2>&1 <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/r/serving16.json"))
for row in d["serving"]["rows"]:
    for r in [row["in_process"], *row["http"]]:
        if r is None: continue
        print(r.get("switch_interval_ms"), "gpu", r.get("gpu"),
              "wall", {k: round(v, 2) for k, v in r["host_ms_per_step"].items()},
              "cpu", {k: round(v, 2) for k, v in r["host_cpu_ms_per_step"].items()},
              "server_cpu_s", r.get("server_thread_cpu_s"), "engine_cpu_s", r.get("engine_thread_cpu_s"),
              "us/token", r.get("server_cpu_us_per_token"), "decode steps", r.get("decode_steps"),
              "rows", r.get("decode_rows_mean"), "prefill steps", r.get("prefill_steps"))
PY
cat $S

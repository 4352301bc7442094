# Fifty-fourth session's first GPU call (carry [".whl"]):
#  1. s52's planned check (never run: s52 and s53 got no machine): scripts/serve.py with
#     mistral-7b at max_model_len 32,768 and --gpu_memory_utilization=0.9, four concurrent
#     30,000-token prompts, /metrics' device-memory peak against the allocator's limit;
#  2. s53's CPU-only changes compiled on the GPU: the blocked prefill attention past the key
#     block with a static window (tests/test_model.py -k blocked_prefill_attention), windowed
#     prefix sharing and the scheduler's adapter-page cases (test_engine, test_engine_scheduling).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
PYTHONPATH=.:/tmp/site timeout 420 python3 scripts/serve.py --model=mistral-7b --dtype=bfloat16 --max_model_len=32768 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 410 python3 docs/results/s52/serve_long_check.py 8123 4 30000 > $R/check.log 2>&1; echo "check rc=$? at ${SECONDS}s" >> $S
kill %1 2>/dev/null; sleep 3; cat $R/check.log >> $S; grep -E "gpu_memory_utilization|warm|device memory|KV|Error|Traceback" $R/serve.log | cut -c1-500 | head -20 >> $S
left=$((580 - SECONDS)); [ $left -gt 40 ] && { PYTHONPATH=.:/tmp/site timeout $left python3 -m pytest -q -x -m "gpu or not gpu" tests/test_model.py tests/test_engine.py tests/test_engine_scheduling.py -k "blocked_prefill_attention or released_before_its_window or adapter_pages or window" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -5 $R/tests.log >> $S; }
date >> $S; cat $S

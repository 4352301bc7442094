# Fifty-seventh session, call 4 (H100; carry [".whl"]: the server's fastapi / uvicorn):
#  1-2. the serving section (new): S-LoRA's trace (5 adapters, prompts and outputs uniform in
#       [8, 512], Poisson) served by one engine in-process, then through the OpenAI server
#       over HTTP with the load-test client in its own process; 8 req/s (below capacity) and
#       16 req/s (above it), 30 s of arrivals each;
#  3.   call 3's system-prompt trace at 30 req/s, caching on, again: its floor now counts each
#       shared K/V page once (call 3's 102.2% "floor / elapsed" counted them once a row).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=.:/tmp/site
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S
# The load-test client's httpx, where the machine lacks it (.whl/httpx: httpx, httpcore, h11).
python3 -c "import httpx; print('httpx', httpx.__version__)" >> $S 2>&1 || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/httpx/*.whl > /dev/null 2>&1; python3 -c "import httpx; print('httpx (carried)', httpx.__version__)" >> $S 2>&1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
for RATE in 8 16; do
  timeout 185 python3 scripts/benchmark.py --section=serving --online_adapters=5 --online_rate=$RATE \
    --online_duration_s=30 --online_drain_s=30 --json_out=$R/serving$RATE.json > $R/serving$RATE.log 2>&1
  echo "serving rate $RATE rc=$? at ${SECONDS}s" >> $S
  grep -E "copy bandwidth|matmul rate|online n=|serving n=" $R/serving$RATE.log >> $S
  sed -n '/### Serving over HTTP/,/### Targets/p' $R/serving$RATE.log >> $S
done
timeout 120 python3 scripts/benchmark.py --section=online --online_adapters=5 --online_prefix_len=1024 \
  --online_min_len=8 --online_max_len=256 --online_duration_s=30 --online_drain_s=30 --online_kv_pages=5000 \
  --online_prefix_caching=on --online_rate=30 --json_out=$R/rate30.json > $R/rate30.log 2>&1
echo "prefix rate 30 rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|matmul rate|online n=" $R/rate30.log >> $S
sed -n '/### Shared system prompts/,/### Targets/p' $R/rate30.log >> $S
cat $S

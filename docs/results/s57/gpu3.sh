# Fifty-seventh session, call 3 (H100): call 2's trace with system prompts (1,024 tokens an
# adapter, own prompt and output uniform in [8, 256], 5 adapters, 5,000 KV pages), where call 2
# left gaps: (1) below capacity with caching off too (8 req/s offered, 30 s of arrivals), for
# first-token latency without queueing; (2) caching on at 30 req/s (call 2's 19.4 req/s did not
# fill the engine with caching on): its capacity.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
B="python3 scripts/benchmark.py --section=online --online_adapters=5 --online_prefix_len=1024 --online_min_len=8 --online_max_len=256 --online_duration_s=30 --online_drain_s=30 --online_kv_pages=5000"
timeout 250 $B --online_prefix_caching=off,on --online_rate=8 --json_out=$R/rate8.json > $R/rate8.log 2>&1; echo "rate8 rc=$? at ${SECONDS}s" >> $S
timeout 250 $B --online_prefix_caching=on --online_rate=30 --json_out=$R/rate30.json > $R/rate30.log 2>&1; echo "rate30 rc=$? at ${SECONDS}s" >> $S
for N in rate8 rate30; do
grep -E "copy bandwidth|matmul rate|online n=" $R/$N.log >> $S
sed -n '/### Shared system prompts/,/### Targets/p' $R/$N.log >> $S
done
cat $S

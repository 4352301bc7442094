# Fifty-seventh session, call 2 (H100): the online trace with per-adapter system prompts, served
# with prefix caching off and then on by one compiled engine (llama-2-7b shape, random bf16,
# rank 16 on all 7 modules): 1,024-token system prompts, each request's own prompt and output
# uniform in [8, 256], Poisson arrivals at 20 req/s for 45 s, 5 and 100 adapters (S-LoRA's
# popularity, alpha 1), 5,000 KV pages (40 GB); the copy bandwidth and the matmul rate measured
# in the same process for the trace's floor.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
timeout 560 python3 scripts/benchmark.py --section=online --online_adapters=5,100 \
  --online_prefix_len=1024 --online_prefix_caching=off,on --online_min_len=8 --online_max_len=256 \
  --online_rate=20 --online_duration_s=45 --online_drain_s=30 --online_kv_pages=5000 \
  --json_out=$R/prefix.json > $R/prefix.log 2>&1; echo "prefix rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|matmul rate|engine ready|online n=" $R/prefix.log >> $S
sed -n '/### Shared system prompts/,/### Targets/p' $R/prefix.log >> $S
cat $S

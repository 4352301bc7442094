# Fifty-ninth session, call 3 (H100): issue 7's online target at the current code, in one
# process: S-LoRA's trace at capacity (24 req/s offered for 20 s, 20 s to drain) with 5 and with
# 2,000 adapters, as the fifty-second session ran it (91.4%; the engine's host path has changed
# since: packed arguments as numpy, the vectorized sampler batch, prefix-cache bookkeeping).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
timeout 400 python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=24 \
  --online_duration_s=20 --online_drain_s=20 --json_out=$R/online.json > $R/online.log 2>&1
echo "online rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|matmul rate|online n=|Error" $R/online.log | grep -v "^W" >> $S
grep -E "^\| adapters|^\| (5|2000) |online throughput" $R/online.log >> $S
date >> $S; cat $S

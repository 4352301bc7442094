# Fifty-second session, call 1 (written in the fifty-first as docs/results/s51/next_gpu.sh, run
# as it was at 2f8b119): eight 8,192-token prompts, llama-3-8b at max_model_len 32,768, the
# fifty-first session's defaults (blocked past 4,096 keys) against cuDNN's one pass (no block)
# and the whole table in XLA's; then the online trace at the fifty-first session's defaults.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
PROMPT_LEN=8192 timeout 300 python3 docs/results/s51/context_buckets.py llama-3-8b 32768 512_2048_4096-auto 512_2048_8192_32768-cudnn-noblock whole-xla > $R/long.log 2>&1; echo "long rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/long.log >> $S
left=$((590 - SECONDS)); [ $left -gt 200 ] && { timeout $left python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=24 --online_duration_s=20 --online_drain_s=20 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$? at ${SECONDS}s" >> $S; grep -E "online adapters|req/s|Error" $R/online.log | tail -6 >> $S; }
date >> $S; cat $S

# Fifty-second session, call 3: what four 30,000-token prompts' prefill steps take beyond the
# engine's resident arrays (mistral-7b at max_model_len 32,768, the server's prefill defaults),
# cuDNN's one pass (the new default) and XLA's blocked path, against the server's estimate.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
for a in auto xla; do
  left=$((590 - SECONDS)); [ $left -gt 60 ] || break
  timeout $left python3 docs/results/s52/prefill_memory.py mistral-7b $a > $R/memory_$a.log 2>&1; echo "$a rc=$? at ${SECONDS}s" >> $S; grep -E "GiB|prompts in|Error" $R/memory_$a.log >> $S
done
# Then what the doubled context buckets cost at start-up at max_model_len 32,768 (mistral-7b):
# the new default (five cut widths) against the fifty-first session's 512 / 2,048 / 4,096.
for b in default 512_2048_4096; do
  left=$((590 - SECONDS)); [ $left -gt 150 ] || break
  MAX_LEN=32768 timeout $left python3 docs/results/s51/warmup_cost.py mistral-7b $b > $R/warmup_$b.log 2>&1; echo "warmup $b rc=$? at ${SECONDS}s" >> $S; grep -E "buckets|Error" $R/warmup_$b.log >> $S
done
date >> $S; cat $S

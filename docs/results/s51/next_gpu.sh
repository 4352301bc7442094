# For the next session with device time (written in the fifty-first, whose device time ran out
# before its sixth call):
#  1. long prompts through the prefill paths (gpu6.sh's experiment, with the old engine's
#     whole-table run back): 8 x 8,192-token prompts, llama-3-8b, max_model_len 32,768: the new
#     defaults (cut tables up to 4,096 keys, XLA's blocked attention past them) against cuDNN's
#     one pass over tables cut to 512 / 2,048 / 8,192 / 32,768 keys with no blocked path. If the
#     one pass wins, let cuDNN's attention skip the blocked path (model._cached_attention) and
#     give prefill_context_buckets buckets up to the model's context.
#  2. the online trace at the new prefill defaults (issue 7's fourth target; the engines there
#     run max_model_len 1,024, so short prompts now read 512-key tables in cuDNN's attention).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
PROMPT_LEN=8192 timeout 300 python3 docs/results/s51/context_buckets.py llama-3-8b 32768 512_2048_4096-auto 512_2048_8192_32768-cudnn-noblock whole-xla > $R/long.log 2>&1; echo "long rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/long.log >> $S
left=$((590 - SECONDS)); [ $left -gt 200 ] && { timeout $left python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=24 --online_duration_s=20 --online_drain_s=20 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$? at ${SECONDS}s" >> $S; grep -E "online adapters|req/s|Error" $R/online.log | tail -6 >> $S; }
date >> $S; cat $S

# Fifty-first session's sixth GPU call: long prompts (8 x 8,192 tokens, llama-3-8b,
# max_model_len 32,768, chunks of 256) through two prefill paths: the new defaults (tables cut
# to 512 / 2,048 / 4,096 keys, cuDNN's one pass up to 4,096, XLA's blocked attention past it)
# and cuDNN's one pass over tables cut to 512 / 2,048 / 8,192 / 32,768 keys with no blocked
# path. (The old engine's whole-table run was dropped for the device time left.)
R=$OUT/r; mkdir -p $R; export PYTHONPATH=. PROMPT_LEN=8192
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
timeout 230 python3 docs/results/s51/context_buckets.py llama-3-8b 32768 512_2048_4096-auto 512_2048_8192_32768-cudnn-noblock > $R/long.log 2>&1; echo "long rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/long.log >> $S
date >> $S; cat $S

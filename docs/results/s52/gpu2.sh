# Fifty-second session, call 2: cuDNN's one pass over prefill tables past prefill_key_block
# (the new default, 21dd5e4) on the H100.
#  1. the GPU tests of the prefill attention (model level: a long table in cuDNN's one pass
#     against XLA's blocked path; the engine's cuDNN / XLA prefill comparisons);
#  2. llama-3-8b at max_model_len 32,768, eight prompts of 4,608 / 8,192 / 16,384 tokens: the new
#     defaults (buckets 512 ... 16,384 below the table, cuDNN's one pass past 4,096 keys) against
#     XLA's attention with the fifty-first session's buckets (blocked past 4,096: what the
#     fifty-first session's defaults ran past 4,096 keys).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
git log --oneline -1 >> $S 2>/dev/null
timeout 240 python3 -m pytest -q -m "gpu or not gpu" tests/test_model.py tests/test_engine_gpu.py -k "cudnn or one_pass or blocked" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/tests.log >> $S
for n in 8192 4608 16384; do
  left=$((590 - SECONDS)); [ $left -gt 60 ] || break
  PROMPT_LEN=$n timeout $left python3 docs/results/s51/context_buckets.py llama-3-8b 32768 512_2048_4096_8192_16384-auto 512_2048_4096-xla > $R/long_$n.log 2>&1; echo "long $n rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/long_$n.log >> $S
done
date >> $S; cat $S

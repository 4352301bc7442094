# Fifty-first session's first GPU call:
#  1. the compiled bf16 engine with the prefill attention in cuDNN against XLA's (prompt
#     logprobs), head_dim 32 and Gemma's 256 (tests/test_engine_gpu.py -k cudnn), the
#     model-level cuDNN cases again (tests/test_model.py -k cudnn), and the prefill context
#     buckets in the compiled engine (tests/test_engine.py -k narrowest_table: CPU-sized, run on
#     the GPU backend);
#  2. context_buckets.py: llama-3-8b prefill (8 x 256 prompts) at max_model_len 32,768 and 4,096,
#     the whole table (blocked / one pass) against tables cut to the context, XLA and cuDNN.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
timeout 230 python3 -m pytest -q -m "gpu or not gpu" tests/test_engine_gpu.py tests/test_model.py tests/test_engine.py -k "cudnn or narrowest_table" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/tests.log >> $S
B="python3 docs/results/s51/context_buckets.py llama-3-8b"
timeout 200 $B 32768 whole-xla 4096-xla 4096-cudnn 512_1024_2048_4096-cudnn 512_1024_2048_4096-xla > $R/ctx32768.log 2>&1; echo "ctx 32768 rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/ctx32768.log >> $S
left=$((585 - SECONDS)); [ $left -gt 60 ] && { timeout $left $B 4096 whole-xla whole-cudnn 512_1024_2048-cudnn 512_1024_2048-xla > $R/ctx4096.log 2>&1; echo "ctx 4096 rc=$? at ${SECONDS}s" >> $S; grep -E "max_model_len|Error" $R/ctx4096.log >> $S; }
date >> $S; cat $S

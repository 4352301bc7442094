# For the next session with device time (written in the fiftieth, whose device time ran out):
#  1. the compiled bf16 engine with the prefill attention in cuDNN against XLA's (prompt
#     logprobs; tests/test_engine_gpu.py -k cudnn) and the model-level cuDNN cases again;
#  2. Gemma's head_dim 256 through it (the gemma family engine with --prefill_attention=cudnn is
#     not a test yet: the family test runs float32, where cuDNN is not used; run the offline
#     benchmark on gemma-2b in bf16 with it instead);
#  3. if both pass, make "cudnn" RunnerConfig.prefill_attention's default on the GPU.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S
timeout 200 python3 -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_model.py -k cudnn > $R/cudnn_tests.log 2>&1; echo "cudnn tests rc=$?" >> $S; tail -3 $R/cudnn_tests.log >> $S
for impl in xla cudnn; do timeout 150 python3 scripts/benchmark.py --section=offline --model=gemma-2b --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=no_lora --prefill_attention=$impl --json_out=$R/gemma_$impl.json > $R/gemma_$impl.log 2>&1; echo "gemma-2b $impl rc=$?" >> $S; grep -i "error" $R/gemma_$impl.log | tail -2 >> $S; done
date >> $S; cat $S

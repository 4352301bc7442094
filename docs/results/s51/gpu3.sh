# Fifty-first session's third GPU call: the new defaults (RunnerConfig.prefill_attention "auto",
# prefill_context_buckets (512, 2048, 4096)) in the compiled bf16 engine against XLA's whole-table
# prefill (tests/test_engine_gpu.py -k cudnn, head_dim 32 and Gemma's 256), the model-level
# cuDNN / auto cases, the context buckets' CPU-sized engine test on the GPU backend; then what the
# buckets cost at start-up (warmup_cost.py: llama-2-7b, the server's GPU config, default vs none).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
[ "${1:-}" = warmup ] || timeout 240 python3 -m pytest -q -m "gpu or not gpu" tests/test_engine_gpu.py tests/test_model.py tests/test_engine.py -k "cudnn or auto_prefill or narrowest_table" > $R/tests.log 2>&1; echo "tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/tests.log >> $S
for which in default none; do
  left=$((590 - SECONDS)); [ $left -gt 90 ] || break
  timeout $left python3 docs/results/s51/warmup_cost.py llama-2-7b $which > $R/warmup_$which.log 2>&1; echo "warmup $which rc=$? at ${SECONDS}s" >> $S; grep -E "^buckets|Error" $R/warmup_$which.log >> $S
done
date >> $S; cat $S

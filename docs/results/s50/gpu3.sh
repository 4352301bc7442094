# Fiftieth session's third GPU call: XLA's prefill attention against cuDNN's fused attention
# (prefill_cudnn.py), then RunnerConfig.prefill_attention="cudnn" against XLA's in the model's
# prefill attention (tests/test_model.py -k cudnn, gpu-marked).
R=$OUT/r3; mkdir -p $R; export PYTHONPATH=.
[ "${1:-}" = test ] || timeout 240 python3 docs/results/s50/prefill_cudnn.py > $R/prefill_cudnn.log 2>&1; echo "cudnn timing rc=$?" > $R/summary.txt
grep -E "^(keys|  |NVIDIA)" $R/prefill_cudnn.log >> $R/summary.txt
timeout 200 python3 -m pytest -q -m gpu tests/test_model.py -k cudnn > $R/cudnn_test.log 2>&1; echo "cudnn test rc=$?" >> $R/summary.txt; tail -25 $R/cudnn_test.log >> $R/summary.txt
cat $R/summary.txt

# For the next session with device time (written in the forty-ninth, which had none): the
# forty-ninth session's changes on the GPU, and the forty-eighth's call 5.
#  1. the prefill attention's zeroed unread keys and the NaN-logits error, on the GPU backend
#     (XLA's dot_product_attention and the blocked path there; the tiny engine);
#  2. the compiled engine against the reference engine's tokens (every prefill goes through
#     the change);
#  3. lora_matmul's final placement cases and the dot epilogue's T = 40 cases (s48 call 5).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 120 python3 -m pytest -q tests/test_model.py tests/test_engine.py -k "blind or stale_nan or overflow" > $R/cpu_tests_on_gpu.log 2>&1; echo "blind/stale/overflow rc=$?" >> $S; tail -2 $R/cpu_tests_on_gpu.log >> $S; date >> $R/times.txt
timeout 250 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -k matches_reference > $R/engine_test.log 2>&1; echo "engine test rc=$?" >> $S; tail -2 $R/engine_test.log >> $S; date >> $R/times.txt
timeout 170 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "compiled and (before_or_after or (matches_reference and 40 and dot))" > $R/lora_matmul.log 2>&1; echo "lora_matmul rc=$?" >> $S; tail -2 $R/lora_matmul.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

# Thirty-ninth session, call 3 (H100): the other kernels' GPU tests on an H100 (earlier: H200):
# lora_matmul's reference cases, paged attention, residual norm and SwiGLU.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 200 python3 -m pytest -m gpu tests/test_lora_matmul.py -k "matches_reference or default_config or few_adapters or split_k" -q -p no:cacheprovider > $R/lora_matmul.log 2>&1; echo "lora_matmul rc=$?" >> $S; tail -2 $R/lora_matmul.log >> $S; date >> $R/times.txt
timeout 60 python3 -m pytest -m gpu tests/test_residual_norm.py tests/test_swiglu.py -q -p no:cacheprovider > $R/norm_swiglu.log 2>&1; echo "norm_swiglu rc=$?" >> $S; tail -2 $R/norm_swiglu.log >> $S; date >> $R/times.txt
timeout 150 python3 -m pytest -m gpu tests/test_paged_attention.py -q -p no:cacheprovider > $R/attention.log 2>&1; echo "attention rc=$?" >> $S; tail -2 $R/attention.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

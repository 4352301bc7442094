# Forty-first session, call 7: the family engines again with Qwen2.5-7B's proportions for the
# Qwen2 model (7 query heads a KV head, hidden 448 = 3.5 x 128, intermediate 1184), and the
# compiled paged-attention kernel at 7 queries a KV head (Qwen2.5-7B's 28 / 4).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k each_family > $R/gpu_family.log 2>&1; echo "family rc=$?" >> $S; tail -2 $R/gpu_family.log >> $S; date >> $R/times.txt
timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_paged_attention.py -k "compiled_kernel_matches_reference and -7-" > $R/gpu_attention.log 2>&1; echo "attention rc=$?" >> $S; tail -2 $R/gpu_attention.log >> $S
date >> $R/times.txt; cat $S $R/times.txt

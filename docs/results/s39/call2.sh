# Thirty-ninth session, call 2 (H100, run as written): the fp8 K/V cache's compiled attention
# cases with the attention kernel's compiled reference cases (130 s limit), HF transformers +
# PEFT at batch 8, jaxlora's batch 8 (issue 7's >= 30x).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.; S=$R/summary.txt; date > $R/times.txt
timeout 130 python3 -m pytest -m gpu tests/test_paged_attention.py tests/test_engine_gpu.py -k "fp8 or compiled_kernel" -q -p no:cacheprovider > $R/fp8_tests.log 2>&1; echo "fp8_tests rc=$?" >> $S; tail -2 $R/fp8_tests.log >> $S; date >> $R/times.txt
timeout 130 python3 scripts/bench_peft.py --batch_sizes=8 --max_time_s=8 --json_out=$R/peft.json > $R/peft.log 2>&1; echo "peft rc=$?" >> $S; date >> $R/times.txt
timeout 140 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=identical,distinct --json_out=$R/offline_b8.json > $R/offline_b8.log 2>&1; echo "offline_b8 rc=$?" >> $S; grep "tok/s" $R/offline_b8.log | cut -c40- >> $S; date >> $R/times.txt
cat $S $R/times.txt

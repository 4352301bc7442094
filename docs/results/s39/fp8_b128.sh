# Thirty-ninth session: prepared, NOT run (no device time left): the fp8 K/V cache compiled,
# then batch 128 without LoRA with an fp8 and an auto cache (two processes).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 150 python3 -m pytest -m gpu tests/test_paged_attention.py tests/test_engine_gpu.py -k "fp8 or compiled_kernel" -q -p no:cacheprovider > $R/fp8_tests.log 2>&1; echo "fp8_tests rc=$?" >> $S; tail -2 $R/fp8_tests.log >> $S; date >> $R/times.txt
for D in fp8 auto; do
timeout ${LIMIT:-120} python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --kv_cache_dtype=$D --json_out=$R/b128_$D.json > $R/b128_$D.log 2>&1; echo "b128 $D rc=$?" >> $S; grep "tok/s\|iteration" $R/b128_$D.log | cut -c40- >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

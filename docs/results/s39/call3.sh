# Thirty-ninth session, call 3 (H100, run as written): the fp8 engine test (and the fp8
# attention cases again), then the online trace at 5 and 2,000 adapters (rate 16/s: below the
# H100's capacity, as it turned out).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.; S=$R/summary.txt; date > $R/times.txt
timeout 110 python3 -m pytest -m gpu tests/test_engine_gpu.py tests/test_paged_attention.py -k "fp8_kv_cache or reads_fp8" -q -p no:cacheprovider > $R/fp8_engine.log 2>&1; echo "fp8_engine rc=$?" >> $S; tail -2 $R/fp8_engine.log >> $S; date >> $R/times.txt
timeout 225 python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=16 --online_duration_s=20 --online_drain_s=30 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$?" >> $S; grep "online n=" $R/online.log | cut -c40- >> $S; date >> $R/times.txt
cat $S $R/times.txt

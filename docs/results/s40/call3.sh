# Fortieth session, call 3 (H100): the online trace at 5 and 2,000 adapters at the rate the
# H200 ran (24/s offered), which keeps requests waiting on the H100: the target's own judgement.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.; S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 330 python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=24 --online_duration_s=20 --online_drain_s=20 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$?" >> $S; grep "online n=" $R/online.log | cut -c40- >> $S; date >> $R/times.txt
cat $S $R/times.txt

# Thirty-ninth session, call 2 (H100): HF transformers + PEFT at batch 8 and jaxlora's batch 8
# (issue 7's >= 30x), then the online trace at 5 and 2,000 adapters, first times on an H100.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 130 python3 scripts/bench_peft.py --batch_sizes=8 --max_time_s=8 --json_out=$R/peft.json > $R/peft.log 2>&1; echo "peft rc=$?" >> $S; date >> $R/times.txt
timeout 150 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=identical,distinct --json_out=$R/offline_b8.json > $R/offline_b8.log 2>&1; echo "offline_b8 rc=$?" >> $S; grep "tok/s" $R/offline_b8.log | cut -c40- >> $S; date >> $R/times.txt
timeout 240 python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=16 --online_duration_s=20 --online_drain_s=30 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$?" >> $S; grep "online n=" $R/online.log | cut -c40- >> $S; date >> $R/times.txt
cat $S $R/times.txt

# Forty-fifth session, call 4 (H100): gemma-2-9b's decode steps against their roofline with the
# pools sized apart (call3 ran out of memory at batch 128 with 29 GB of pools; now 14 GB). The
# Qwen rows planned here were dropped, and batch 32 and the identical rows: failed machine
# starts left too little device time.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 190 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora,distinct --json_out=$R/gemma-2-9b.json > $R/gemma-2-9b.log 2>&1; echo "gemma-2-9b rc=$?" >> $S; grep "tok/s\|copy bandwidth\|Error" $R/gemma-2-9b.log | cut -c40-260 >> $S; date >> $R/times.txt
cat $S $R/times.txt

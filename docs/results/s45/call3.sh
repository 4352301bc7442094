# Forty-fifth session, call 3 (H100): the long-context prefill again with each row's two most
# likely first tokens (call2's blocked and one-pass first tokens differed in one row of eight:
# a near tie, or a fault?), then the Gemma families' decode steps against their rooflines
# (head_dim 256; gemma-2-9b: soft caps, sandwich norms, alternate windows of 4,096 that a
# 384-token context does not reach; gemma-7b: 16 KV heads of 256), rank 16 on the 7 modules.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for M in blocked one_pass; do
timeout 90 python3 docs/results/s45/long_context_prefill.py $M > $R/long_$M.log 2>&1; echo "long $M rc=$?" >> $S; grep "prefills\|top-2" $R/long_$M.log >> $S; date >> $R/times.txt
done
timeout 240 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,identical,distinct --json_out=$R/gemma-2-9b.json > $R/gemma-2-9b.log 2>&1; echo "gemma-2-9b rc=$?" >> $S; grep "tok/s\|copy bandwidth\|Error" $R/gemma-2-9b.log | cut -c40-260 >> $S; date >> $R/times.txt
timeout 150 python3 scripts/benchmark.py --model=gemma-7b --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,distinct --json_out=$R/gemma-7b.json > $R/gemma-7b.log 2>&1; echo "gemma-7b rc=$?" >> $S; grep "tok/s\|copy bandwidth\|Error" $R/gemma-7b.log | cut -c40-260 >> $S; date >> $R/times.txt
cat $S $R/times.txt

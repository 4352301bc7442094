# Forty-sixth session, call 2 (H100): the second half of docs/results/s45/next_gpu.sh — gemma-2-9b
# with XLA's norms (--residual_norm=xla) and a profile of the default's batch-32 decode step.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for N in xla; do
timeout 200 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,distinct --residual_norm=$N --json_out=$R/g2_$N.json > $R/g2_$N.log 2>&1; echo "gemma-2-9b residual_norm=$N rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/g2_$N.log | cut -c40-260 >> $S; date >> $R/times.txt
done
timeout 150 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --batch_sizes=32 --offline_workloads=no_lora --profile_steps=3 --json_out=$R/g2_profile.json > $R/g2_profile.log 2>&1; echo "profile rc=$?" >> $S
ls $R >> $S
cat $S $R/times.txt

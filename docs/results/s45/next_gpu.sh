# Prepared in the forty-fifth session, NOT run (device time spent): the sandwich residual-norm
# launches (Gemma 2 / 3) compiled, the Gemma engines with them against their reference engines,
# then gemma-2-9b on an H100 (80 GB: the pools sized apart must fit) with the sandwich launches
# (default) against XLA's norms (--residual_norm=xla), one process each, and a profile of the
# default's batch-32 decode step. About 9 minutes: run with kind=nvidia-h100-x1.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 60 python3 -m pytest -m gpu -q tests/test_residual_norm.py -k sandwich > $R/sandwich.log 2>&1
echo "sandwich kernel rc=$?" >> $S; tail -1 $R/sandwich.log >> $S
timeout 150 python3 -m pytest -m gpu -q tests/test_engine_gpu.py -k "each_family and gemma" > $R/gemma_engines.log 2>&1
echo "gemma engines rc=$?" >> $S; tail -1 $R/gemma_engines.log >> $S; date >> $R/times.txt
for N in pallas xla; do
timeout 170 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,distinct --residual_norm=$N --json_out=$R/g2_$N.json > $R/g2_$N.log 2>&1; echo "gemma-2-9b residual_norm=$N rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/g2_$N.log | cut -c40-260 >> $S; date >> $R/times.txt
done
timeout 120 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --batch_sizes=32 --offline_workloads=no_lora --profile_steps=3 --json_out=$R/g2_profile.json > $R/g2_profile.log 2>&1; echo "profile rc=$?" >> $S
cat $S $R/times.txt

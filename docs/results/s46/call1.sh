# Forty-sixth session, call 1 (H100): the first half of docs/results/s45/next_gpu.sh — the
# sandwich residual-norm kernel compiled, the Gemma engines against their reference engines, and
# gemma-2-9b batch 32/128 with the sandwich launches (default --residual_norm=pallas).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 60 python3 -m pytest -m gpu -q tests/test_residual_norm.py -k sandwich > $R/sandwich.log 2>&1
echo "sandwich kernel rc=$?" >> $S; tail -1 $R/sandwich.log >> $S
timeout 150 python3 -m pytest -m gpu -q tests/test_engine_gpu.py -k "each_family and gemma" > $R/gemma_engines.log 2>&1
echo "gemma engines rc=$?" >> $S; tail -1 $R/gemma_engines.log >> $S; date >> $R/times.txt
for N in pallas; do
timeout 200 python3 scripts/benchmark.py --model=gemma-2-9b --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,distinct --residual_norm=$N --json_out=$R/g2_$N.json > $R/g2_$N.log 2>&1; echo "gemma-2-9b residual_norm=$N rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/g2_$N.log | cut -c40-260 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

# Forty-sixth session, call 3 (H100): is Gemma 2's host time per decode iteration (about twice
# llama-2-7b's in every phase, forty-fifth / forty-sixth sessions) the model's or the machine's?
# llama-2-7b and gemma-2-9b at batch 128 without LoRA on one machine, plain and under cProfile
# (where the host's "dispatch" and "build" go).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for M in llama-2-7b gemma-2-9b; do
timeout 140 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --json_out=$R/$M.json > $R/$M.log 2>&1; echo "$M plain rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/$M.log | cut -c40-260 >> $S; date >> $R/times.txt
timeout 160 python3 -m cProfile -o $R/$M.prof scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --copy_bandwidth_gbps=3000 --json_out=$R/${M}_prof.json > $R/${M}_prof.log 2>&1; echo "$M cProfile rc=$?" >> $S; grep "tok/s\|async: iteration\|Error" $R/${M}_prof.log | cut -c40-260 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

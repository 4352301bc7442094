# Forty-third session, call 3 (H100): with lora_update="in_place" the default, the compiled
# engine against the reference engine's tokens (eight engines); then the Qwen profiles prepared
# in the forty-second session (docs/results/s42/next_gpu_qwen_profile.sh).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k matches_reference > $R/engine_gpu.log 2>&1; echo "engine vs reference (in_place default) rc=$?" >> $S; tail -2 $R/engine_gpu.log >> $S; date >> $R/times.txt
for M in qwen3-8b qwen2.5-7b; do
timeout 110 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,distinct --profile_steps=3 --json_out=$R/prof_$M.json > $R/prof_$M.log 2>&1; echo "prof $M rc=$?" >> $S; grep "tok/s\|iteration\|roofline\|copy" $R/prof_$M.log | cut -c1-250 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

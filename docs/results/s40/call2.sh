# Fortieth session, call 2 (H100): batch 128 without LoRA with an fp8 and an auto K/V cache
# (two processes): the fp8 cache's speed (the thirty-ninth session's fp8_b128.sh, less its tests).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for D in fp8 auto; do
timeout 130 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --kv_cache_dtype=$D --json_out=$R/b128_$D.json > $R/b128_$D.log 2>&1; echo "b128 $D rc=$?" >> $S; grep "tok/s\|iteration" $R/b128_$D.log | cut -c40- >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

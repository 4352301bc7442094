# Forty-third session, call 2 (H100): the lora_update A/B again in the other order (delta first),
# then the sliding-window page release and windowed prefill gather (4276b91) on the GPU: the
# family engines (mistral window 24) against their references, and the CPU engine test of the
# release run there (tiny model on the GPU).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for U in delta in_place; do
timeout 150 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,identical,distinct --lora_update=$U --json_out=$R/ab_$U.json > $R/ab_$U.log 2>&1; echo "ab $U rc=$?" >> $S; grep "tok/s" $R/ab_$U.log | cut -c1-250 >> $S; date >> $R/times.txt
done
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k "each_family" > $R/family_engines.log 2>&1; echo "family engines rc=$?" >> $S; tail -2 $R/family_engines.log >> $S
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_model_families.py -k "releases or sliding" > $R/window_release.log 2>&1; echo "window release rc=$?" >> $S; tail -2 $R/window_release.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

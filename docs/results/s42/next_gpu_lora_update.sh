# Prepared in the forty-second session, NOT run (no machine was lent after call 1): the A/B of
# RunnerConfig.lora_update, "in_place" (opt-in, new) against "delta" (the default, the sixth
# session's float32 delta), llama-2-7b bf16 rank 16, batch 32 (prefill steps on XLA's GEMMs + SGMV;
# decode in lora_matmul, unchanged) and 128 (decode on cuBLAS + SGMV too): prefill_s and the
# decode iterations of the LoRA rows; one process each, in_place, delta, in_place (order effects).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for U in in_place delta in_place; do
N=$((N+1)); timeout 190 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,identical,distinct --lora_update=$U --json_out=$R/ab${N}_$U.json > $R/ab${N}_$U.log 2>&1; echo "ab$N $U rc=$?" >> $S; grep "tok/s" $R/ab${N}_$U.log | cut -c1-250 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

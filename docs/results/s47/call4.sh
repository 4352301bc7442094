# Forty-seventh session, call 4 (H100): where the LoRA's time goes in the llama-2-7b decode step
# on the H100 (the profiles of earlier sessions were the H200's): batch 32 and 128, no LoRA and
# 32 / 128 distinct adapters, 3 profiled async iterations each (the default kernels).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
timeout 300 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,128 --offline_workloads=no_lora,distinct --profile_steps=3 --json_out=$R/profile.json > $R/profile.log 2>&1; echo "profile rc=$?" >> $S
grep "async: iteration\|profile \|^ *[0-9.]* ms  *[0-9.]*x" $R/profile.log | cut -c1-200 >> $S
date >> $R/times.txt; cat $S $R/times.txt

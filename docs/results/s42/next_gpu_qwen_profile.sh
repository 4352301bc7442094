# Forty-second session, prepared, not run: where the Qwen2.5 decode step's extra time goes (1.29x
# its roofline against llama-2-7b's 1.20x at batch 32): both presets profiled at batch 32 (no
# LoRA, distinct), then the qwen2.5-7b rows at batch 64 / 128 (s41's next_gpu.sh, first half).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
# qwen3-8b: its q / k head norms now run in the RoPE kernel, qwen2.5-7b's q|k|v bias in
# lora_matmul (forty-second session); against the forty-first session's 3,556.8 / 2,950.0 and
# 4,070.5 / 3,176.4 tokens/s (H100, batch 32, no LoRA / distinct).
for M in qwen3-8b qwen2.5-7b llama-2-7b; do
timeout 150 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,distinct --profile_steps=3 --json_out=$R/prof_$M.json > $R/prof_$M.log 2>&1; echo "prof $M rc=$?" >> $S; grep "tok/s\|iteration\|roofline\|copy" $R/prof_$M.log | cut -c1-250 >> $S; date >> $R/times.txt
done
timeout 120 python3 scripts/benchmark.py --model=qwen2.5-7b --section=offline --layer_loop=scan --free_running=async --batch_sizes=64,128 --offline_workloads=no_lora,distinct --json_out=$R/b64_qwen2.5-7b.json > $R/b64_qwen2.5-7b.log 2>&1; echo "b64/128 qwen2.5-7b rc=$?" >> $S; grep "tok/s" $R/b64_qwen2.5-7b.log | cut -c1-250 >> $S
date >> $R/times.txt; cat $S $R/times.txt

# Forty-third session, call 5 (H100): the sliding window's time. Mistral 7B v0.2 shapes without a
# window (mistral-7b) and with v0.1's 4,096-key window (mistral-7b-v0.1), batch 8, 8,192-token
# prompts (one a prefill step), 32 tokens out, no LoRA: a v0.1 decode step reads 4,096 keys a
# row, not 8,192+, and its roofline counts so.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for M in mistral-7b-v0.1 mistral-7b; do
timeout 130 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=no_lora --prompt_len=8192 --output_len=32 --prefill_rows=1 --json_out=$R/$M.json > $R/$M.log 2>&1; echo "$M rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/$M.log | cut -c40-260 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

# Fifty-sixth session's second GPU call (carry [".whl"]); at most 6 files come back (the first
# call's 13 were cut to 8):
#  1. a llama-2-7b-shaped HF checkpoint (transformers, random bf16, 5 GB shards) read by
#     load_hf_checkpoint with the tiled copies on 1 worker and the default threads
#     (docs/results/s56/load_workers.py); scripts/serve.py on it at --gpu_memory_utilization=0.9,
#     ready time (the first call: 161.0 s with the old loader), one completion;
#  2. where batch 32's uniform row (6 adapters; 1.32-1.34x its roofline, the grid's worst) and
#     identical row spend their time: 3 profiled async iterations each (the forty-seventh
#     session profiled no LoRA and distinct on an H100).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; L=$R/log.txt; date > $S; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
timeout 120 python3 -c "
import torch, transformers
c = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
with torch.device('cuda'):
    m = transformers.LlamaForCausalLM(c).to(torch.bfloat16)
m.save_pretrained('/tmp/llama7b', max_shard_size='5GB')
" >> $L 2>&1; echo "checkpoint rc=$? at ${SECONDS}s" >> $S
timeout 150 python3 docs/results/s56/load_workers.py /tmp/llama7b > $R/load.log 2>&1; echo "load rc=$? at ${SECONDS}s" >> $S; grep -v Warn $R/load.log | tail -5 >> $S
PYTHONPATH=.:/tmp/site timeout 200 python3 scripts/serve.py --model=/tmp/llama7b --dtype=bfloat16 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 195 python3 docs/results/s41/serve_check.py 8123 > $R/check.log 2>&1; echo "serve_check rc=$? at ${SECONDS}s" >> $S
kill %1 2>/dev/null; sleep 3; head -2 $R/check.log >> $S; grep -E "gpu_memory_utilization|warm|Error|Traceback" $R/serve.log | cut -c1-300 | head -6 >> $S
rm -rf /tmp/llama7b
left=$((585 - SECONDS)); [ $left -gt 60 ] && { timeout $left python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=identical,uniform --profile_steps=3 > $R/profile.log 2>&1; echo "profile rc=$? at ${SECONDS}s" >> $S; grep "async: iteration\|profile \|^ *[0-9.]* ms  *[0-9.]*x\|copy bandwidth" $R/profile.log | cut -c1-220 >> $S; }
date >> $S; cat $S

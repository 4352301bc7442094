# Forty-third session, call 4 (H100; carry _exp): issue 7's offline grid at the new default
# (lora_update="in_place"): llama-2-7b, batch 32 / 64 / 128, the five workloads; then a HF
# checkpoint of a 7B model served at --gpu-memory-utilization=0.9 (s41/next_gpu.sh's second half).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 260 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32,64,128 --json_out=$R/grid.json > $R/grid.log 2>&1; echo "grid rc=$?" >> $S; grep "tok/s\|copy bandwidth" $R/grid.log | cut -c40-250 >> $S; grep "^| " $R/grid.log | tail -8 >> $S; date >> $R/times.txt
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
timeout 100 python3 -c "
import torch, transformers
c = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
with torch.device('cuda'):
    m = transformers.LlamaForCausalLM(c).to(torch.bfloat16)
m.save_pretrained('/tmp/llama7b', max_shard_size='5GB')
" > $R/make_ckpt.log 2>&1; echo "checkpoint rc=$?" >> $S; date >> $R/times.txt
PYTHONPATH=.:/tmp/site timeout 170 python3 scripts/serve.py /tmp/llama7b --dtype=bfloat16 --gpu-memory-utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 165 python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; head -5 $R/serve_check.log >> $S; grep "gpu_memory_utilization\|warm\|Error" $R/serve.log | cut -c1-400 | head -8 >> $S
date >> $R/times.txt; cat $S $R/times.txt

# Prepared in the forty-first session, NOT run (device time spent): the Qwen presets' other
# rows (batch 64 / 128, identical / uniform / distinct) and a HF checkpoint of a 7B model at
# --gpu_memory_utilization=0.9 (written there by transformers, fused on the host by the loader:
# no allocator hole expected). Carry _exp (the server's wheels, as in call2.sh).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
for M in qwen2.5-7b qwen3-8b; do
timeout 200 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=64,128 --offline_workloads=no_lora,identical,distinct --json_out=$R/b64_$M.json > $R/b64_$M.log 2>&1; echo "b64/128 $M rc=$?" >> $S; grep "tok/s" $R/b64_$M.log | cut -c40- >> $S; date >> $R/times.txt
done
timeout 150 python3 -c "
import torch, transformers
c = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
with torch.device('cuda'):
    m = transformers.LlamaForCausalLM(c).to(torch.bfloat16)
m.save_pretrained('/tmp/llama7b', max_shard_size='5GB')
" > $R/make_ckpt.log 2>&1; echo "checkpoint rc=$?" >> $S
PYTHONPATH=.:/tmp/site timeout 200 python3 scripts/serve.py /tmp/llama7b --dtype=bfloat16 --gpu-memory-utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 195 python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; head -3 $R/serve_check.log >> $S; grep "gpu_memory_utilization\|warm\|Error" $R/serve.log | cut -c1-500 >> $S
cat $S $R/times.txt

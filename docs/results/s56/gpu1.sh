# Fifty-sixth session's first GPU call (carry [".whl"]):
#  1. batch 32, uniform (6 adapters) and skewed: lora_matmul's few-adapters epilogue for blocks
#     of 32 tokens with up to 8 adapters (MatmulConfig.wide_epilogue_min_tokens 32; default 64:
#     blocks of 32 take it with up to 4), never timed at batch 32; default and variant in
#     alternating processes (A B A B);
#  2. a llama-2-7b-shaped HF checkpoint (transformers, random bf16, 5 GB shards): the load time
#     with the fifty-fifth session's finiteness check of every base weight and without it
#     (docs/results/s56/load_time.py); then scripts/serve.py on it at
#     --gpu_memory_utilization=0.9 and one completion (docs/results/s41/serve_check.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
for N in a b a2 b2; do
  case $N in a|a2) MC='{}';; b|b2) MC='{"wide_epilogue_min_tokens":32}';; esac
  timeout 110 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=uniform,skewed --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$? at ${SECONDS}s" >> $S
done
python3 -c "
import json
for n in ('a', 'b', 'a2', 'b2'):
    try:
        d = json.load(open('$R/eng_%s.json' % n))['offline']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in d['rows']:
        print(n, r['batch'], r['workload'], round(r['iteration_ms_median'], 3), round(r['roofline_ms'], 3), round(r['iteration_ms_median'] / r['roofline_ms'], 4), r['output_digest'])
" >> $S 2>&1
grep -h "copy bandwidth" $R/eng_*.log | head -4 >> $S
timeout 120 python3 -c "
import torch, transformers
c = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
with torch.device('cuda'):
    m = transformers.LlamaForCausalLM(c).to(torch.bfloat16)
m.save_pretrained('/tmp/llama7b', max_shard_size='5GB')
" > $R/make_ckpt.log 2>&1; echo "checkpoint rc=$? at ${SECONDS}s" >> $S
timeout 150 python3 docs/results/s56/load_time.py /tmp/llama7b > $R/load_time.log 2>&1; echo "load_time rc=$? at ${SECONDS}s" >> $S; cat $R/load_time.log | grep -v Warning | tail -6 >> $S
left=$((585 - SECONDS)); if [ $left -gt 100 ]; then
PYTHONPATH=.:/tmp/site timeout $((left - 5)) python3 scripts/serve.py --model=/tmp/llama7b --dtype=bfloat16 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout $((left - 10)) python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$? at ${SECONDS}s" >> $S
kill %1 2>/dev/null; sleep 2; head -5 $R/serve_check.log >> $S; grep -E "gpu_memory_utilization|warm|ready|Error|Traceback" $R/serve.log | cut -c1-400 | head -10 >> $S
fi
date >> $S; cat $S

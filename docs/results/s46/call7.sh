# Forty-sixth session, call 7 (H100), carry .whl: --no-enable-lora (new; vLLM's spelling) on the
# llama-2-7b preset at --gpu-memory-utilization=0.9: the sizing line (adapter pools of one page,
# their memory in the KV cache) and one completion; against call 6's 6,498 KV pages with the
# default pools (5.69 GiB).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
PYTHONPATH=.:/tmp/site timeout 200 python3 scripts/serve.py --model=llama-2-7b --dtype=bfloat16 --gpu-memory-utilization=0.9 --port=8123 --no-enable-lora > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 195 python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; head -3 $R/serve_check.log >> $S; grep "kv_cache_pages_total \|adapter_pool_pages_total" $R/serve_check.log >> $S; grep "gpu_memory_utilization\|engine warm\|Error" $R/serve.log | cut -c1-400 >> $S
date >> $R/times.txt; cat $S $R/times.txt

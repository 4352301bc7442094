# Forty-sixth session, call 6 (H100), carry .whl: call 5 again after return_token_ids and --enable-lora (new): the answers carry token ids, streamed too; call 5 was call 4's third part again with fastapi's
# opentelemetry-api wheel added (call 4's server stopped at its import): serve.py on a
# llama-2-7b-shaped HF checkpoint with a PEFT adapter at --gpu-memory-utilization=0.9.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
test -f /tmp/adapter16/adapter_config.json || { timeout 150 python3 docs/results/s46/make_hf_llama_and_peft.py /tmp/llama7b /tmp/adapter16 > $R/make_ckpt.log 2>&1; echo "checkpoint rc=$?" >> $S; }
ls -la /tmp/llama7b /tmp/adapter16 >> $S; date >> $R/times.txt
PYTHONPATH=.:/tmp/site timeout 300 python3 scripts/serve.py /tmp/llama7b --dtype=bfloat16 --gpu-memory-utilization=0.9 --port=8123 --enable-lora --lora-modules a16=/tmp/adapter16 --max-lora-rank=16 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 295 python3 docs/results/s46/serve_hf_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_hf_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; cat $R/serve_check.log >> $S; grep "gpu_memory_utilization\|warm\|device memory\|Error\|adapter" $R/serve.log | cut -c1-400 | head -20 >> $S
date >> $R/times.txt; cat $S $R/times.txt

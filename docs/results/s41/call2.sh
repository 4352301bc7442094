# Forty-first session, call 2: --gpu_memory_utilization=0.9 on llama-2-7b (H100) with the
# largest-free-block rule (call 1 at 19b0f76: the V pool did not fit in a fragmented region);
# its steps one at a time with the allocator's peak (s40's memory_check.py); then serve.py at
# 0.9 over HTTP, its sizing and warm log lines, a completion and /metrics' device memory.
# Carry _exp (the server's wheels).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
PYTHONPATH=.:/tmp/site timeout 200 python3 docs/results/s40/memory_check.py 0.9 64 llama-2-7b probe > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|step (\|peak\|share\|Error" $R/memory_check.log | cut -c1-400 >> $S; date >> $R/times.txt
PYTHONPATH=.:/tmp/site timeout 230 python3 scripts/serve.py --model=llama-2-7b --dtype=bfloat16 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 225 python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; tail -5 $R/serve_check.log >> $S; grep "gpu_memory_utilization\|warm\|device memory\|Error" $R/serve.log | cut -c1-400 >> $S
cat $S $R/times.txt

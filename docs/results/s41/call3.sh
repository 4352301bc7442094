# Forty-first session, call 3: the hole a preset's device-side fusion leaves (fragmentation.py,
# both ways), then --gpu_memory_utilization=0.9 again with the weights made fused (memory_check,
# serve.py over HTTP). Carry _exp (the server's wheels).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
for m in after one_jit; do timeout 60 python3 docs/results/s41/fragmentation.py $m 2>&1 | grep -v tpu >> $S; done
PYTHONPATH=.:/tmp/site timeout 200 python3 docs/results/s40/memory_check.py 0.9 64 llama-2-7b > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|peak\|share\|Error" $R/memory_check.log | cut -c1-500 >> $S; date >> $R/times.txt
PYTHONPATH=.:/tmp/site timeout 200 python3 scripts/serve.py --model=llama-2-7b --dtype=bfloat16 --gpu_memory_utilization=0.9 --port=8123 > $R/serve.log 2>&1 &
PYTHONPATH=.:/tmp/site timeout 195 python3 docs/results/s41/serve_check.py 8123 > $R/serve_check.log 2>&1; echo "serve_check rc=$?" >> $S
kill %1 2>/dev/null; sleep 2; head -3 $R/serve_check.log >> $S; grep device_memory $R/serve_check.log | grep -v "^#" >> $S; grep "gpu_memory_utilization\|warm\|Error" $R/serve.log | cut -c1-500 >> $S
cat $S; date >> $R/times.txt; cat $R/times.txt

# Fortieth session, call 2b (H100): --gpu_memory_utilization=0.9 on llama-2-7b again, every
# server package carried (opentelemetry-api, annotated-doc too), then the online trace at 5 and
# 2,000 adapters at 24/s offered (call3.sh's run, moved here to use the warm machine).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1; echo "pip rc=$?" >> $S
PYTHONPATH=.:/tmp/site timeout 240 python3 docs/results/s40/memory_check.py 0.9 64 > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|peak\|working\|share\|in_use\|limit" $R/memory_check.log | cut -c1-300 >> $S; date >> $R/times.txt
timeout 330 python3 scripts/benchmark.py --section=online --online_adapters=5,2000 --online_rate=24 --online_duration_s=20 --online_drain_s=20 --json_out=$R/online.json > $R/online.log 2>&1; echo "online rc=$?" >> $S; grep "online n=" $R/online.log | cut -c40- >> $S; date >> $R/times.txt
cat $S $R/times.txt

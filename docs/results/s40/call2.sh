# Fortieth session, call 2 (H100, as run): --gpu_memory_utilization=0.9 on llama-2-7b
# (docs/results/s40/memory_check.py; the server's packages carried as wheels in _exp/wheels),
# then batch 128 without LoRA with an fp8 and an auto K/V cache (two processes): the fp8
# cache's speed (the thirty-ninth session's fp8_b128.sh, less its tests). The memory check
# failed importing fastapi (opentelemetry-api and annotated-doc were not carried); call2b.sh
# runs it again.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1; echo "pip rc=$?" >> $S
PYTHONPATH=.:/tmp/site timeout 240 python3 docs/results/s40/memory_check.py 0.9 64 > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|peak\|working\|share\|in_use\|limit" $R/memory_check.log | cut -c1-300 >> $S; date >> $R/times.txt
for D in fp8 auto; do
timeout 130 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --kv_cache_dtype=$D --json_out=$R/b128_$D.json > $R/b128_$D.log 2>&1; echo "b128 $D rc=$?" >> $S; grep "tok/s\|iteration" $R/b128_$D.log | cut -c40- >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

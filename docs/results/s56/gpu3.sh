# Fifty-sixth session's third GPU call (carry [".whl"]): the server's start-up with the sampler
# variants compiled on the warm-up's threads (the second call's warm-up: lowered 20.3 s, steps
# compiled 20.9 s, run with the samplers 53.5 s; engine warm 94.7 s): scripts/serve.py
# --model=llama-2-7b (random bf16 weights made on the device) at --gpu_memory_utilization=0.9
# with an empty compilation cache, then again on the same cache (a restart: README says it
# hits the cache, never tried on the GPU), one completion each.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
rm -rf /tmp/jaxcc
for N in 1 2; do
  PYTHONPATH=.:/tmp/site timeout 230 python3 scripts/serve.py --model=llama-2-7b --dtype=bfloat16 --gpu_memory_utilization=0.9 --compilation_cache_dir=/tmp/jaxcc --port=8123 > $R/serve$N.log 2>&1 &
  PYTHONPATH=.:/tmp/site timeout 225 python3 docs/results/s41/serve_check.py 8123 > $R/check$N.log 2>&1; echo "start $N: serve_check rc=$? at ${SECONDS}s" >> $S
  kill %1 2>/dev/null; wait 2>/dev/null; sleep 2
  head -2 $R/check$N.log >> $S; grep -E "warm-up|engine warm|Error|Traceback" $R/serve$N.log | cut -c1-300 | head -4 >> $S
  du -sh /tmp/jaxcc >> $S 2>&1
done
date >> $S; cat $S

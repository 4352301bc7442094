# Fifty-first session's fifth GPU call (run inline on the warm machine after gpu3.sh; this file
# records the commands): the llama-2-7b engine at the new defaults (prefill attention "auto", the
# context buckets), batch 32, first no LoRA and distinct, then all five workloads.
export PYTHONPATH=.; mkdir -p $OUT/r
timeout 200 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,distinct --json_out=$OUT/r/b32.json > $OUT/r/b32.log 2>&1
timeout 200 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,identical,uniform,skewed,distinct --json_out=$OUT/r/b32all.json > $OUT/r/b32all.log 2>&1
grep -E "offline batch=|copy|decode step <=" $OUT/r/b32all.log | cut -c1-400

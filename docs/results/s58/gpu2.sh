# Fifty-eighth session, call 2 (H100 or H200, no carry):
#  1. offline batch 8 and 32, no LoRA and distinct, async iterations: the step's and the
#     sampler's packed host arrays now go to jit as numpy (no jax.device_put): the engine's
#     host time an iteration (wall and CPU by phase) and the iteration against its roofline,
#     beside the fifty-fifth session's grid (same commands, H100: batch 32 7.41 / 8.87 ms);
#  2. docs/results/s58/host_profile.py: the serving section's in-process trace (5 adapters,
#     16 req/s) under cProfile: where the engine's host time an iteration goes at the 7B shape.
export PYTHONPATH=.
R=$OUT/r; mkdir -p $R; S=$R/summary.txt; date > $S
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >> $S
timeout 250 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async \
  --batch_sizes=8,32 --offline_workloads=no_lora,distinct --json_out=$R/offline.json > $R/offline.log 2>&1
echo "offline rc=$? at ${SECONDS}s" >> $S
grep -E "copy bandwidth|host ms" $R/offline.log | cut -c1-400 >> $S
sed -n '/### Offline/,/### Targets/p' $R/offline.log >> $S
timeout 300 python3 docs/results/s58/host_profile.py 16 $R/host_profile > $R/host_profile.log 2>&1
echo "host_profile rc=$? at ${SECONDS}s" >> $S
head -8 $R/host_profile.log >> $S
cat $S

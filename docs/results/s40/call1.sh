# Fortieth session, call 1 (H100): the device's memory report (for --gpu_memory_utilization),
# the 12 SGMV GPU tests the thirty-ninth session's limit left and the in-scan attention case,
# then batch 128 without LoRA with an fp8 and an auto K/V cache (two processes).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,driver_version --format=csv > $R/gpu.txt 2>&1
timeout 60 python3 -c "
import jax, jax.numpy as jnp
d = jax.devices()[0]; print(d, d.device_kind); print('before', d.memory_stats())
x = jnp.ones((1024, 1024, 256), jnp.bfloat16); x.block_until_ready(); print('after 512 MiB', d.memory_stats())
" > $R/memory_stats.txt 2>&1; echo "memory_stats rc=$?" >> $S
timeout 130 python3 -m pytest -m gpu tests/test_sgmv.py tests/test_paged_attention.py -k "(realistic and 300) or repeats_its_bits or apply_matches or delta_matches or in_scan_over_layers" -q -p no:cacheprovider > $R/gpu_tests.log 2>&1; echo "gpu_tests rc=$?" >> $S; tail -2 $R/gpu_tests.log >> $S; date >> $R/times.txt
for D in fp8 auto; do
timeout 130 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --kv_cache_dtype=$D --json_out=$R/b128_$D.json > $R/b128_$D.log 2>&1; echo "b128 $D rc=$?" >> $S; grep "tok/s\|iteration" $R/b128_$D.log | cut -c40- >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

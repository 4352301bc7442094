# Fortieth session, call 1 (H100): the device's memory report (for --gpu_memory_utilization),
# the 12 SGMV GPU tests the thirty-ninth session's limit left and the in-scan attention case,
# then --gpu_memory_utilization=0.9 on llama-2-7b (docs/results/s40/memory_check.py).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,driver_version --format=csv > $R/gpu.txt 2>&1
timeout 60 python3 -c "
import jax, jax.numpy as jnp
d = jax.devices()[0]; print(d, d.device_kind); print('before', d.memory_stats())
x = jnp.ones((1024, 1024, 256), jnp.bfloat16); x.block_until_ready(); print('after 512 MiB', d.memory_stats())
" > $R/memory_stats.txt 2>&1; echo "memory_stats rc=$?" >> $S
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 60 python3 -c "
import jax; print('fraction 0.5', jax.devices()[0].memory_stats())" >> $R/memory_stats.txt 2>&1
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 python3 -c "
import jax; print('no preallocation', jax.devices()[0].memory_stats())" >> $R/memory_stats.txt 2>&1
timeout 130 python3 -m pytest -m gpu tests/test_sgmv.py tests/test_paged_attention.py -k "(realistic and 300) or repeats_its_bits or apply_matches or delta_matches or in_scan_over_layers" -q -p no:cacheprovider > $R/gpu_tests.log 2>&1; echo "gpu_tests rc=$?" >> $S; tail -2 $R/gpu_tests.log >> $S; date >> $R/times.txt
timeout 240 python3 docs/results/s40/memory_check.py 0.9 64 > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|peak\|working\|share" $R/memory_check.log | cut -c1-300 >> $S; date >> $R/times.txt
cat $S $R/times.txt

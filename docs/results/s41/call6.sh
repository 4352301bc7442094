# Forty-first session, call 6: the Qwen2 / Qwen3 families on the H100: the compiled engine
# against its reference engine (tests/test_engine_gpu.py), then the offline benchmark at batch
# 32 (no LoRA, distinct adapters) on the qwen2.5-7b and qwen3-8b presets (random bf16 weights).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py -k each_family > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?" >> $S; tail -3 $R/gpu_tests.log >> $S; date >> $R/times.txt
for M in qwen2.5-7b qwen3-8b; do
timeout 150 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,distinct --json_out=$R/b32_$M.json > $R/b32_$M.log 2>&1; echo "b32 $M rc=$?" >> $S; grep "tok/s\|iteration\|roofline\|copy" $R/b32_$M.log | cut -c1-250 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

# Forty-seventh session, call 5 (H100): is the ~1 ms a step the GPU waits at batch 128 (async
# iteration 12.86 ms against 11.86 ms busy, call 4) the host's launching? XLA's command buffers
# with the while loop and conditionals captured too (the scan over layers in one CUDA graph),
# against the default, batch 128 no LoRA, one process each.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
W=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE
for N in default while; do
  if [ $N = while ]; then F="$W"; else F=""; fi
  XLA_FLAGS="$F" timeout 110 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=128 --offline_workloads=no_lora --json_out=$R/$N.json > $R/$N.log 2>&1; echo "$N rc=$?" >> $S; grep "async: iteration\|Error\|rror:" $R/$N.log | cut -c40-330 | head -6 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

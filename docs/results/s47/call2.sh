# Forty-seventh session, call 2 (H100): the shrink programs' shape in lora_matmul's launch
# (rank rows and K step of each), against the engine's own separate shrink (the projection
# bench now passes choose_per_token's per_token as the engine does), then the engine at batch 32.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
V='{"l4k2048":{"shrink_in_launch":true,"shrink_launch_rows":4,"shrink_launch_block_k":2048},"l2k2048":{"shrink_in_launch":true,"shrink_launch_rows":2,"shrink_launch_block_k":2048},"l8k1024":{"shrink_in_launch":true,"shrink_launch_rows":8,"shrink_launch_block_k":1024},"l4k512":{"shrink_in_launch":true,"shrink_launch_rows":4,"shrink_launch_block_k":512}}'
timeout 330 python3 scripts/bench_projection.py --configs=default --variants="$V" --lora_configs=default,l4k2048,l2k2048,l8k1024,l4k512 --tokens=32 --pool_rank=16 --lora_workloads=distinct,uniform --layer_loop=scan --xla=false --json_out=$R/projection.json > $R/projection.log 2>&1; echo "projection rc=$?" >> $S; grep -v "^I1\|^W1" $R/projection.log | tail -14 >> $S; date >> $R/times.txt
for N in default l4k2048; do
  if [ $N = default ]; then MC='{}'; else MC='{"shrink_in_launch":true,"shrink_launch_rows":4,"shrink_launch_block_k":2048}'; fi
  timeout 110 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=uniform,distinct --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; grep "async: iteration\|Error" $R/eng_$N.log | cut -c40-160 >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('default', 'l4k2048'):
    try:
        rows = json.load(open('$R/eng_%s.json' % n))['offline']['rows']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in rows:
        print(n, r['batch'], r['workload'], round(r['iteration_ms_median'], 3), round(r['roofline_ms'], 3), r['output_digest'])
" >> $S 2>&1
cat $S $R/times.txt

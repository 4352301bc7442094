# Forty-seventh session, call 1 (H100): the shrink in lora_matmul's own launch
# (MatmulConfig.shrink_in_launch, new): its compiled cases (a hang would be a wait that never
# ends: every command has a timeout), the decode projections with and without it, then the
# 32-layer llama-2-7b engine at batch 32 with and without it.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "shrink_programs or (matches_reference and 40)" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -3 $R/tests.log >> $S; date >> $R/times.txt
V='{"l16":{"shrink_in_launch":true,"shrink_launch_rows":16},"l8":{"shrink_in_launch":true,"shrink_launch_rows":8}}'
timeout 200 python3 scripts/bench_projection.py --configs=default --variants="$V" --lora_configs=default,l16,l8 --tokens=32 --lora_workloads=uniform,distinct --layer_loop=scan --xla=false --json_out=$R/projection.json > $R/projection.log 2>&1; echo "projection rc=$?" >> $S; grep -v "^I1\|^W1" $R/projection.log | tail -40 >> $S; date >> $R/times.txt
for N in default l16; do
  if [ $N = default ]; then MC='{}'; else MC='{"shrink_in_launch":true,"shrink_launch_rows":16}'; fi
  timeout 130 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,identical,uniform,skewed,distinct --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|digest\|Error" $R/eng_$N.log | cut -c40-260 >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('default', 'l16'):
    try:
        rows = json.load(open('$R/eng_%s.json' % n))['offline']['rows']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in rows:
        print(n, r['batch'], r['workload'], round(r['iteration_ms_median'], 3), round(r['roofline_ms'], 3), round(r['iteration_ms_median'] / r['roofline_ms'], 3), r['output_digest'])
" >> $S 2>&1
cat $S $R/times.txt

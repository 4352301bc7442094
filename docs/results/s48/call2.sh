# Forty-eighth session, call 2 (H100): epilogue_step=-1 (the LoRA terms before lora_matmul's K
# loop) against the default at batch 8, 32 and 64 (uniform, skewed, distinct; one process each,
# default first), then its compiled cases.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
for N in default pre; do
  case $N in default) MC='{}';; pre) MC='{"epilogue_step":-1}';; esac
  timeout 170 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=8,32,64 --offline_workloads=uniform,skewed,distinct --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('default', 'pre'):
    try:
        rows = json.load(open('$R/eng_%s.json' % n))['offline']['rows']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in rows:
        it = r['free_running']['async']['iteration_ms_median']
        print(n, r['batch'], r['workload'], round(it, 3), round(r['roofline_ms'], 3), round(it / r['roofline_ms'], 3), r['output_digest'])
" >> $S 2>&1
timeout 200 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "any_k_step" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -3 $R/tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

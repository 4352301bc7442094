# Forty-eighth session, call 4 (H100): the new default (lora_first) against the old order
# (lora_first=false) at batch 32, interleaved A B A B in four processes on one machine.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
for N in after1 first1 after2 first2; do
  case $N in after*) MC='{"lora_first":false}';; first*) MC='{}';; esac
  timeout 90 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=uniform,skewed,distinct --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('after1', 'first1', 'after2', 'first2'):
    try:
        d = json.load(open('$R/eng_%s.json' % n))
    except Exception as e:
        print(n, 'no json', e); continue
    for r in d['offline']['rows']:
        it = r['free_running']['async']['iteration_ms_median']
        print(n, round(d['meta']['copy_GBps']), r['batch'], r['workload'], round(it, 3), round(r['roofline_ms'], 3), round(it / r['roofline_ms'], 3), r['output_digest'])
" >> $S 2>&1
cat $S $R/times.txt

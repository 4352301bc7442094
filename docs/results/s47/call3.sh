# Forty-seventh session, call 3 (H100; carry _exp/old = cda1d51's pallas_kernels, jaxlora,
# scripts, configs: `git archive cda1d51 pallas_kernels jaxlora scripts configs`): the prefill
# expand summing the shrink's K-split partials as it loads v (no XLA launch between the two):
# its compiled cases, then issue 3's grid rows where the split runs (T = 64 / 256 / 1,024,
# identical / uniform / skewed, every group and rank), old kernels and new in two processes,
# then the engine's batch-64 / 128 LoRA rows old and new.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
timeout 150 python3 -m pytest -q -m gpu tests/test_sgmv.py -k "sums_the_shrinks or apply_matches or delta_matches or repeats_its_bits" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -2 $R/tests.log >> $S; date >> $R/times.txt
G="--tokens=64,256,1024 --workloads=identical,uniform,skewed --impls=sgmv --calls=3"
for N in new old; do
  if [ $N = old ]; then D=_exp/old; else D=.; fi
  PYTHONPATH=$D timeout 170 python3 $D/scripts/bench_kernels.py $G --out_json=$R/grid_$N.json > $R/grid_$N.log 2>&1; echo "grid $N rc=$?" >> $S; date >> $R/times.txt
done
for N in new old; do
  if [ $N = old ]; then D=_exp/old; else D=.; fi
  PYTHONPATH=$D timeout 120 python3 $D/scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=64,128 --offline_workloads=identical,uniform --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; grep "async: iteration\|Error" $R/eng_$N.log | cut -c40-150 >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('new', 'old'):
    try:
        rows = json.load(open('$R/eng_%s.json' % n))['offline']['rows']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in rows:
        print(n, r['batch'], r['workload'], round(r['iteration_ms_median'], 3), round(r['roofline_ms'], 3), r['output_digest'])
try:
    new = json.load(open('$R/grid_new.json')); old = json.load(open('$R/grid_old.json'))
    copy = new['copy_GBps']; o = {(r['out'], r['rank'], r['T'], r['workload']): r for r in old['rows']}
    for r in new['rows']:
        k = (r['out'], r['rank'], r['T'], r['workload']); b = o.get(k)
        if not b: continue
        a, c = r['impls']['sgmv'], b['impls']['sgmv']
        print(*k, round(a['busy_us'], 1), round(c['busy_us'], 1), round(a['busy_us'] / c['busy_us'], 3), r['bytes'], [n[:28] for n, _ in a['kernel_us']])
except Exception as e:
    print('grid compare failed', e)
" >> $S 2>&1
cat $S $R/times.txt

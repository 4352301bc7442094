# Forty-eighth session, call 1 (H100): the LoRA terms added before lora_matmul's K loop
# (MatmulConfig.epilogue_step=-1) or inside it at a step (0, 1, 2), so that the epilogue's B and v
# loads overlap the weight stream: its compiled cases, the decode projections at T = 32, then the
# 32-layer llama-2-7b engine at batch 32.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 120 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "any_k_step" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -3 $R/tests.log >> $S; date >> $R/times.txt
V='{"pre":{"epilogue_step":-1},"e0":{"epilogue_step":0},"e1":{"epilogue_step":1},"e2":{"epilogue_step":2}}'
timeout 240 python3 scripts/bench_projection.py --configs=default --variants="$V" --lora_configs=default,pre,e0,e1,e2 --tokens=32 --pool_rank=16 --lora_workloads=distinct,uniform --layer_loop=scan --xla=false --json_out=$R/projection.json > $R/projection.log 2>&1; echo "projection rc=$?" >> $S; grep -v "^I1\|^W1" $R/projection.log | tail -24 >> $S; date >> $R/times.txt
for N in default pre e1; do
  case $N in default) MC='{}';; pre) MC='{"epilogue_step":-1}';; e1) MC='{"epilogue_step":1}';; esac
  timeout 100 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=uniform,distinct --matmul_config="$MC" --json_out=$R/eng_$N.json > $R/eng_$N.log 2>&1; echo "engine $N rc=$?" >> $S; grep "async: iteration\|Error" $R/eng_$N.log | cut -c40-160 >> $S; date >> $R/times.txt
done
python3 -c "
import json
for n in ('default', 'pre', 'e1'):
    try:
        rows = json.load(open('$R/eng_%s.json' % n))['offline']['rows']
    except Exception as e:
        print(n, 'no json', e); continue
    for r in rows:
        print(n, r['batch'], r['workload'], round(r['iteration_ms_median'], 3), round(r['roofline_ms'], 3), round(r['iteration_ms_median'] / r['roofline_ms'], 3), r['output_digest'])
" >> $S 2>&1
cat $S $R/times.txt

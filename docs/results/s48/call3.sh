# Forty-eighth session, call 3 (H100): the new default (MatmulConfig.lora_first: the dot
# epilogue's LoRA terms before the K loop): the compiled engine against the reference engine's
# tokens, then the 32-layer llama-2-7b engine at batch 32, every workload (one process).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
timeout 250 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -k matches_reference > $R/engine_test.log 2>&1; echo "engine test rc=$?" >> $S; tail -3 $R/engine_test.log >> $S; date >> $R/times.txt
timeout 150 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=no_lora,identical,uniform,skewed,distinct --json_out=$R/eng.json > $R/eng.log 2>&1; echo "engine rc=$?" >> $S; grep "copy bandwidth\|Error" $R/eng.log | cut -c40-200 >> $S; date >> $R/times.txt
python3 -c "
import json
rows = json.load(open('$R/eng.json'))['offline']['rows']
for r in rows:
    it = r['free_running']['async']['iteration_ms_median']
    print(r['batch'], r['workload'], round(it, 3), round(r['roofline_ms'], 3), round(it / r['roofline_ms'], 3), round(r['output_tokens_per_s']), r['output_digest'])
" >> $S 2>&1
cat $S $R/times.txt

# Fifty-first session's first GPU call (the fiftieth session's next_gpu.sh, widened):
#  1. the compiled bf16 engine with the prefill attention in cuDNN against XLA's (prompt
#     logprobs), head_dim 32 and Gemma's 256 (tests/test_engine_gpu.py -k cudnn), and the
#     model-level cuDNN cases again (tests/test_model.py -k cudnn);
#  2. gemma-2b (head_dim 256, one KV head) in bf16 through scripts/benchmark.py both ways:
#     prefill step ms, tokens/s, decode digest.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $S
timeout 250 python3 -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_model.py -k cudnn > $R/cudnn_tests.log 2>&1; echo "cudnn tests rc=$? at ${SECONDS}s" >> $S; tail -3 $R/cudnn_tests.log >> $S
for impl in xla cudnn; do
  [ $SECONDS -lt 420 ] || break
  timeout 150 python3 scripts/benchmark.py --section=offline --model=gemma-2b --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=no_lora --prefill_attention=$impl --json_out=$R/gemma_$impl.json > $R/gemma_$impl.log 2>&1; echo "gemma-2b $impl rc=$? at ${SECONDS}s" >> $S
  python3 -c "
import json
d = json.load(open('$R/gemma_$impl.json'))
for r in d['offline']['rows']:
    it = r['free_running']['async']['iteration_ms_median']
    print('$impl', r['batch'], r['workload'], 'prefill step ms', r.get('prefill_step_ms'), 'tok/s', round(r['output_tokens_per_s']), 'iter ms', round(it, 3), r['output_digest'])
" >> $S 2>&1
done
date >> $S; cat $S

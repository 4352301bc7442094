# Fiftieth session's fourth GPU call: the llama-2-7b engine (bf16, rank 16, H100) with the
# prefill attention in XLA and in cuDNN (RunnerConfig.prefill_attention), one process each:
# batch 32 of 256-token prompts (no LoRA, distinct), then, time allowing, batch 8 of 1,024-token
# prompts (no LoRA). Prints each row's prefill seconds a step, tokens/s, decode iteration, digest.
R=$OUT/r4; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $S
bench() {  # name, limit, flags...
  name=$1; limit=$2; shift 2
  timeout $limit python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --json_out=$R/$name.json "$@" > $R/$name.log 2>&1; echo "$name rc=$?" >> $S
  python3 -c "
import json
d = json.load(open('$R/$name.json'))
for r in d['offline']['rows']:
    it = r['free_running']['async']['iteration_ms_median']
    print('$name', r['batch'], r['workload'], 'prefill ms/step', round(r['prefill_s'] / r['prefill_steps'] * 1e3, 2), 'steps', r['prefill_steps'], 'tok/s', round(r['output_tokens_per_s']), 'iter ms', round(it, 3), r['output_digest'])
" >> $S 2>&1
}
for impl in xla cudnn; do bench b32_$impl 140 --batch_sizes=32 --offline_workloads=no_lora,distinct --prefill_attention=$impl; done
for impl in xla cudnn; do [ $SECONDS -lt 220 ] && bench p1024_$impl 65 --batch_sizes=8 --prompt_len=1024 --output_len=16 --offline_workloads=no_lora --prefill_attention=$impl; done
date >> $S; cat $S

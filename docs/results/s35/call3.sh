R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt
run() { name=$1; shift
  timeout 100 python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --offline_workloads=uniform,skewed,distinct --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)" $R/$name.log | cut -c40-170 >> $S; }
run attn2 --attention_shrink
run base2
run attn3 --attention_shrink
run base3
timeout 150 python3 -m pytest tests/test_engine.py -q -k "prompt_logprobs or sliced or lm_head or choices_of_one_prompt" > $R/engine_cpu_tests_on_gpu.log 2>&1
cd $OUT && tar czf all.tgz r && rm -rf r

R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; nvidia-smi > $R/gpu.txt; date > $R/times.txt
python3 -m pip install --no-index --no-deps _exp/wheels/llguidance-*.whl > $R/pip.log 2>&1
timeout 170 python3 -m pytest tests/test_engine.py tests/test_bad_words.py tests/test_engine_scheduling.py -q -k "prompt_logprobs or sliced or lm_head or choices_of_one_prompt or bad_words or llm_chat or priorit" > $R/engine_cpu_tests_on_gpu.log 2>&1; echo "tests rc=$?" >> $S; tail -3 $R/engine_cpu_tests_on_gpu.log >> $S; date >> $R/times.txt
run() { name=$1; t=$2; shift; shift
  timeout $t python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)|profile batch" $R/$name.log | cut -c40-330 >> $S; date >> $R/times.txt; }
run prof_base 130 --offline_workloads=no_lora,distinct --profile_steps=3
run prof_ns_sw 130 --offline_workloads=distinct --profile_steps=3 --norm_shrink --swiglu_shrink
run mbm64_s3 110 --offline_workloads=no_lora,distinct --matmul_config='{"min_block_m": 64, "num_stages": 3}'
cd $OUT && tar czf all.tgz r && rm -rf r

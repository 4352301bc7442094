# Prepared in the thirty-seventh session (no device was lent): the first call of the next
# session that gets one. The compiled engine against the reference engine's tokens after the
# thirty-sixth and thirty-seventh sessions' engine changes (admission refactor, grammar gate,
# allowed tokens, fair scheduling), this session's new engine tests on the GPU, and the
# min_programs knob.
# Run with carry=["_exp"] only if llguidance's wheel is there (_exp/wheels).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
ls _exp/wheels/llguidance-*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps _exp/wheels/llguidance-*.whl
run() { name=$1; t=$2; shift; shift
  timeout $t python3 scripts/benchmark.py --section=offline --layer_loop=scan --free_running=async --batch_sizes=32 --json_out=$R/$name.json "$@" > $R/$name.log 2>&1
  echo "$name rc=$? $*" >> $S; grep -E "offline batch=.*(async|tok/s)" $R/$name.log | cut -c40-250 >> $S; date >> $R/times.txt; }
timeout 230 python3 -m pytest -m gpu tests/test_engine_gpu.py -k matches_reference -q > $R/engine_gpu.log 2>&1; echo "engine_gpu rc=$?" >> $S; tail -2 $R/engine_gpu.log >> $S; date >> $R/times.txt
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_structured_output.py tests/test_bad_words.py tests/test_engine.py tests/test_engine_scheduling.py -k "reasoning or allowed or special or merged_adapter or fair or back_from_idle" > $R/new_tests.log 2>&1; echo "new_tests rc=$?" >> $S; tail -2 $R/new_tests.log >> $S; date >> $R/times.txt
run mp384 100 --offline_workloads=no_lora,distinct --matmul_config='{"min_programs": 384}'
cd $OUT && tar czf all.tgz r && rm -rf r

# Thirty-eighth session: the compiled engine against the reference engine's tokens (not run
# since the thirty-sixth session's admission refactor), then the thirty-seventh and
# thirty-eighth sessions' engine tests on the GPU (tiny model). Trimmed from s37/call1.sh to
# fit what device time was left (no min_programs run). carry=["_exp"] for llguidance's wheel.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
ls _exp/wheels/llguidance-*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps _exp/wheels/llguidance-*.whl
timeout 230 python3 -m pytest -m gpu tests/test_engine_gpu.py -k matches_reference -q -p no:cacheprovider > $R/engine_gpu.log 2>&1; echo "engine_gpu rc=$?" >> $S; tail -3 $R/engine_gpu.log >> $S; date >> $R/times.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_scheduling.py tests/test_structured_output.py tests/test_bad_words.py -k "fair or weight or tenant or reasoning or allowed or back_from_idle" > $R/new_tests.log 2>&1; echo "new_tests rc=$?" >> $S; tail -3 $R/new_tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

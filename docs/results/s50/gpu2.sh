# Fiftieth session's second GPU call: every family's compiled engine against its reference
# engine (Qwen3 with sliding layers new), after the prefill select; what gpu.sh's timing did not
# finish, if anything.
R=$OUT/r2; mkdir -p $R; export PYTHONPATH=.
timeout 420 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -k "each_family" --durations=10 > $R/families.log 2>&1; echo "families rc=$?" > $R/summary.txt; tail -15 $R/families.log >> $R/summary.txt
left=$((585 - SECONDS))
if [ "${1:-}" = timing ] && [ $left -gt 60 ]; then timeout $left python3 docs/results/s50/prefill_select_time.py $R/prefill_select.json > $R/prefill_select.log 2>&1; echo "timing rc=$?" >> $R/summary.txt; cat $R/prefill_select.log >> $R/summary.txt; fi
cat $R/summary.txt

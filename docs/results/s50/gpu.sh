# Fiftieth session's GPU call: the forty-ninth session's next_gpu.sh (its prefill and NaN
# changes on the GPU backend, the compiled engine test, s48's call 5 cases), then the prefill
# select's cost (prefill_select_time.py) in the time left under the call's 600 s.
bash docs/results/s49/next_gpu.sh
left=$((585 - SECONDS)); echo "prefill timing limit ${left}s" >> $OUT/r/times.txt
PYTHONPATH=. timeout $left python3 docs/results/s50/prefill_select_time.py $OUT/r/prefill_select.json > $OUT/r/prefill_select.log 2>&1
echo "prefill timing rc=$?" >> $OUT/r/summary.txt; cat $OUT/r/prefill_select.log; date >> $OUT/r/times.txt

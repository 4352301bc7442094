# Prepared in the forty-third session, NOT run (device time spent): the sliding window's time
# (call5.sh) and the blocked prefill attention at a 32k max_model_len (blocked vs one pass; the
# first tokens must agree).
bash docs/results/s43/call5.sh
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
for M in blocked one_pass; do
timeout 200 python3 docs/results/s43/long_context_prefill.py $M > $R/long_$M.log 2>&1; echo "long $M rc=$?" >> $R/summary.txt; tail -1 $R/long_$M.log >> $R/summary.txt
done
cat $R/summary.txt

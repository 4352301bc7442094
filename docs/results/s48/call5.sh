# Forty-eighth session, call 5 (H100): lora_matmul's compiled cases at the final code
# (lora_first: the dot epilogue's terms before the K loop by default), the new
# test_lora_terms_before_or_after_the_k_loop first.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt
timeout 180 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "before_or_after" > $R/tests_first.log 2>&1; echo "tests (before/after) rc=$?" >> $S; tail -2 $R/tests_first.log >> $S; date >> $R/times.txt
timeout 230 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "not before_or_after" > $R/tests.log 2>&1; echo "tests (the rest) rc=$?" >> $S; tail -2 $R/tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

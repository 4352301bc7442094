# Forty-eighth session, call 5: lora_matmul's compiled cases at the final code (lora_first: the
# dot epilogue's terms before the K loop by default): the placement test and the reference
# cases at T = 40 (every group and epilogue, fp32 + bf16).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 200 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "before_or_after or (matches_reference and 40)" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -2 $R/tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

# Forty-eighth session, call 5: lora_matmul's compiled cases at the final code (lora_first: the
# dot epilogue's terms before the K loop by default): the placement test and the dot
# epilogue's reference cases at T = 40 (every group, fp32 + bf16); run in the 49th session on the
# 355 s of device time left, hence the narrower selection.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 170 python3 -m pytest -q -m gpu tests/test_lora_matmul.py -k "compiled and (before_or_after or (matches_reference and 40 and dot))" > $R/tests.log 2>&1; echo "tests rc=$?" >> $S; tail -2 $R/tests.log >> $S; date >> $R/times.txt
cat $S $R/times.txt

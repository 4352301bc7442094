# As run in the forty-first session (call 1, at 19b0f76): the fortieth session's next_gpu.sh.
# on llama-2-7b after the start-up fix (6c7f61d: weights fused before the engine allocates, the
# pools waited for at build), its steps one at a time with the allocator's peak; then the
# in-scan attention case on an H100. Carry _exp (the server's wheels) as in call2b.sh.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
PYTHONPATH=.:/tmp/site timeout 240 python3 docs/results/s40/memory_check.py 0.9 64 llama-2-7b probe > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|step (\|peak\|share\|Error" $R/memory_check.log | cut -c1-300 >> $S; date >> $R/times.txt
timeout 200 python3 -m pytest -m gpu tests/test_paged_attention.py -k in_scan_over_layers -q -p no:cacheprovider > $R/in_scan.log 2>&1; echo "in_scan rc=$?" >> $S; tail -2 $R/in_scan.log >> $S
cat $S $R/times.txt

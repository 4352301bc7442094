# Fortieth session, call 4: the llama-2-7b memory check at a share of 0.6 inside an allocator
# that may hold 0.9 (so that a copy of a K/V pool fits and shows in the peak), its first six
# steps run one at a time: were the pools donated, and how far did the peak move? Then the
# tiny model's step probe (1,000,000 pages) with the same questions.
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
pip install -q --no-index --no-deps --target /tmp/site _exp/wheels/*.whl > $R/pip.log 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONPATH=.:/tmp/site timeout 200 python3 docs/results/s40/memory_check.py 0.6 8 llama-2-7b probe > $R/memory_check.log 2>&1; echo "memory_check rc=$?" >> $S; grep "KV pages\|generated\|step (\|peak\|working\|share\|in_use\|limit\|Error\|transfer" $R/memory_check.log | cut -c1-400 >> $S; date >> $R/times.txt
timeout 90 python3 docs/results/s40/step_memory.py 1000000 > $R/step_memory.log 2>&1; echo "step_memory rc=$?" >> $S; grep "ran (\|temporaries\|transfer" $R/step_memory.log | head -12 >> $S
cat $S $R/times.txt

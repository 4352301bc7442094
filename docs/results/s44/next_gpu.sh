# Prepared in the forty-fourth session (no device time: 231 s left, too little to start a
# machine), NOT run: the compiled cases of this session's kernel change (the decode kernel's
# logit_softcap and traced layer_window, Gemma 2) and the Gemma / Gemma 2 engines against their reference engines
# (head_dim 256; Gemma 2's sandwich norms and soft caps). About 2-3 minutes; then
# docs/results/s43/next_gpu.sh.
R=$OUT/s44; mkdir -p $R; export PYTHONPATH=.
timeout 150 python3 -m pytest -m gpu -q tests/test_paged_attention.py -k "soft_capped or traced_layer_window" > $R/softcap.log 2>&1
echo "softcap rc=$?" >> $R/summary.txt; tail -1 $R/softcap.log >> $R/summary.txt
timeout 300 python3 -m pytest -m gpu -q tests/test_engine_gpu.py -k "each_family and gemma" > $R/gemma_engines.log 2>&1
echo "gemma engines rc=$?" >> $R/summary.txt; tail -1 $R/gemma_engines.log >> $R/summary.txt
cat $R/summary.txt

# Forty-fifth session, call 1 (H100): the forty-fourth session's prepared runs (the decode
# kernel's logit soft cap and traced layer window compiled; the Gemma / Gemma 2 / Gemma 3 engines
# against their reference engines, head_dim 256), then the forty-third session's call5.sh (the
# sliding window's decode time: Mistral v0.1's 4,096-key window against v0.2 without one).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
timeout 100 python3 -m pytest -m gpu -q tests/test_paged_attention.py -k "soft_capped or traced_layer_window" > $R/softcap.log 2>&1
echo "softcap rc=$?" >> $S; tail -1 $R/softcap.log >> $S; date >> $R/times.txt
timeout 220 python3 -m pytest -m gpu -q tests/test_engine_gpu.py -k "each_family and gemma" > $R/gemma_engines.log 2>&1
echo "gemma engines rc=$?" >> $S; tail -1 $R/gemma_engines.log >> $S; date >> $R/times.txt
for M in mistral-7b-v0.1 mistral-7b; do
timeout 120 python3 scripts/benchmark.py --model=$M --section=offline --layer_loop=scan --free_running=async --batch_sizes=8 --offline_workloads=no_lora --prompt_len=8192 --output_len=32 --prefill_rows=1 --json_out=$R/$M.json > $R/$M.log 2>&1; echo "$M rc=$?" >> $S; grep "tok/s\|async: iteration\|copy bandwidth\|Error" $R/$M.log | cut -c40-260 >> $S; date >> $R/times.txt
done
cat $S $R/times.txt

# Forty-fifth session, call 2 (H100): the forty-third session's long-context prefill (llama-3-8b,
# max_model_len 32,768, blocked against one pass; first tokens must agree), then the first half of
# the forty-second session's SGMV knob sweep (decode shapes of issue 7: D and Ddown of
# docs/results/s42/call1.sh, whose defaults come from H200 sweeps).
R=$OUT/r; mkdir -p $R; export PYTHONPATH=.
S=$R/summary.txt; date > $R/times.txt; nvidia-smi -L >> $R/times.txt 2>&1
for M in blocked one_pass; do
timeout 110 python3 docs/results/s43/long_context_prefill.py $M > $R/long_$M.log 2>&1; echo "long $M rc=$?" >> $S; tail -1 $R/long_$M.log >> $S; date >> $R/times.txt
done
eval "$(sed -n '/^DV=/,/^DI=/p' docs/results/s42/call1.sh)"
B="timeout 170 python3 scripts/bench_kernels.py --calls=3"
$B --tokens=32,64,128 --ranks=16 --outs=3x4096,4096,2x11008 --workloads=identical,uniform,distinct --impls=$DI --variants="$DV" --out_json=$R/d.json > $R/d.txt 2>&1; echo "D rc=$?" >> $S; date >> $R/times.txt
$B --hidden=11008 --tokens=32,64,128 --ranks=16 --outs=4096 --workloads=identical,uniform,distinct --impls=$DI --variants="$DV" --out_json=$R/dd.json > $R/dd.txt 2>&1; echo "Ddown rc=$?" >> $S
date >> $R/times.txt; cat $S $R/times.txt
